"""The DARE paper (Yu et al., 2023, "Language Models are Super Mario") in miniature, on models
we train ourselves, merged by the `leanmerge` command as a user runs it.

1. Pretrain a tiny Llama (transformers' `LlamaForCausalLM`: 2 layers, width 256, 8 heads) on a
   mixture of synthetic tasks (`tasks.py`: modular subtraction in two number domains, copying),
   with a few examples per batch of the three fine-tuning tasks, so the base solves them partway.
2. Fine-tune it on each of modular addition, modular multiplication and reversal (each domain
   with its own tokens) with a tenth of the pretraining learning rate for 200 steps (SFT-like),
   and once on addition with the pretraining learning rate for 400 steps (the paper's
   continued-pre-training counter-case).
3. `leanmerge merge --method dare_linear` with one model drops a fraction p of its delta:
   `--rescale` is DARE, `--no-rescale` the paper's DropOnly ablation; swept over p.
   Then the fine-tunes are merged with linear, task_arithmetic, ties, dare_linear, dare_ties,
   della, breadcrumbs and model_stock (plus sparser TIES / DARE rows), the seeded ones over
   several mask seeds.
4. Every model is scored on every task (exact-match accuracy on a fixed, seeded set), beside
   `leanmerge inspect`'s delta statistics and its continued-pre-training warning.

`python -m bench.efficacy [--quick]` writes `bench/results/efficacy-<UTC>.json`, `.md` (the
tables) and `.png`. Modules: tasks, model, train, evaluate, merges (the CLI calls), run, report.

Where the miniature differs from the paper (bench/results/efficacy-20261207T185859Z.*): DARE
keeps 97-100% of each SFT fine-tune's accuracy at p = 0.9 (DropOnly 40-65%, near the base), as
in the paper, but the continued-pre-training model keeps 61%. Merges keep part of each
fine-tune's gain over the base, not most of it: the best (TIES, DELLA) 32-70% per task, task
arithmetic 16-42%, and DARE before TIES or task arithmetic keeps less than without it. The SFT
deltas are 10-13% of the weights (a 7B's are ~1%), so `inspect` warns on two of the three.
Tried and not kept (in-memory probes, same training code): fine-tunes that teach a task from
nothing (the first version: every merge fell to the base; at width 256 with per-domain tokens
task arithmetic kept 61% of add's gain and 85% of inc's, rev unlearned); new instruction tokens
for tasks the base already knows (rev and inc then fight over the same heads); three modular
tables (learned too slowly at a small learning rate); SFT at 1e-4 on this base (deltas 5-8%:
task arithmetic at λ 0.7 kept 68/74/52% of the add/mul/rev gains, DARE-TIES 64/78/33%);
replay, frozen embeddings, a lower λ.
"""
