"""The DARE paper (Yu et al., 2023, "Language Models are Super Mario") in miniature, on models
we train ourselves, merged by the `leanmerge` command as a user runs it.

1. Pretrain a tiny Llama (transformers' `LlamaForCausalLM`: 2 layers, width 256, 8 heads) on a
   mixture of synthetic tasks (`tasks.py`: modular subtraction in two number domains, copying),
   with a few examples per batch of the three fine-tuning tasks, so the base solves them partway.
2. Fine-tune it on each of modular addition, modular multiplication and reversal (each domain
   with its own tokens) with a hundredth of the pretraining learning rate for 400 steps (SFT-like),
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

Where the miniature differs from the paper (bench/results/efficacy-20261207T211259Z.*): DARE
keeps 99-100% of each SFT fine-tune's accuracy at p = 0.9 (DropOnly falls to near the base), as
in the paper; the continued-pre-training model falls to the base's accuracy at 0.9 and `inspect`
warns on it. Merges of the three fine-tunes keep about 80% of each fine-tune's gain over the base
(task arithmetic 81-86%; DARE before it, even at p = 0.9, 77-86%; DARE-TIES 79-84% where TIES
alone keeps 52-64%); in the paper's 7B-13B models merges keep nearly all. The SFT deltas are
3-6% of the weights (a 7B's are ~1%).

What made merges work here (in-memory probes with the same training code, share of the gain kept
by task arithmetic λ 1): small fine-tuning steps. On this run's base, at 1e-4 for 200 steps
(deltas 4-8%) 69-86%, at 5e-5 for 400 70-82%, at 3e-5 for 400 84-86%.
The figures depend on the base, too: the same seeds trained with 1 torch thread instead of 2 give
a base that solves the tasks less (0.33 / 0.43 / 0.60): fine-tuned at 3e-4 for 200 steps (the
previous full run, deltas 10-13%) TA kept 16-42%, at 1e-4 40-59%, and at 3e-5 the fine-tunes
reach only 0.75-0.92 and merge to 60-63% (67-75% at λ 0.7); a base pretrained twice as long
already solves add and rev (0.89, 0.98), and at width 512 the base did not learn rev at all.
Other bases (`--seed`): seed 2 (efficacy-20261207T221205Z) gives the same picture with weaker
fine-tunes (TA 82-88%, DARE-TIES 73-88%, TIES 41-59%); seed 1 (efficacy-20261207T220456Z) a base
that already solves add and rev, where the gains are too small to measure a merge.
Tried before and not kept: fine-tunes that teach a task from nothing (every merge fell to the
base), new instruction tokens for tasks the base already knows, three modular tables, replay of
the pretraining tasks while fine-tuning (no better at 1e-4), frozen embeddings.
"""
