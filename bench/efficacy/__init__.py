"""The DARE paper (Yu et al., 2023, "Language Models are Super Mario") in miniature, on models
we train ourselves, merged by the `leanmerge` command as a user runs it.

1. Pretrain a tiny Llama (transformers' `LlamaForCausalLM`: 2 layers, width 128) on a mixture
   of synthetic tasks (`tasks.py`: copy, modular subtraction, induction pairs).
2. Fine-tune it on each of three other tasks (modular addition, reversal, increment) with a
   tenth of the pretraining learning rate (SFT-like, small deltas), and once with the
   pretraining learning rate for as long as the pretraining (the paper's continued-pre-training
   counter-case).
3. `leanmerge merge --method dare_linear` with one model drops a fraction p of its delta:
   `--rescale` is DARE, `--no-rescale` the paper's DropOnly ablation; swept over p.
   Then the fine-tunes are merged with task_arithmetic, ties, dare_linear, dare_ties, della,
   breadcrumbs and model_stock, the seeded ones over several mask seeds.
4. Every model is scored on every task (exact-match accuracy on a fixed, seeded set), beside
   `leanmerge inspect`'s delta statistics and its continued-pre-training warning.

`python -m bench.efficacy [--quick]` writes `bench/results/efficacy-<UTC>.json`, `.md` (the
tables) and `.png`. Modules: tasks, model, train, evaluate, merges (the CLI calls), run, report.

Where the miniature differs from the paper (bench/results/efficacy-20261207T160335Z.*): DARE
keeps 70-77% of add / inc accuracy at p = 0.9 (DropOnly falls to the base), but not 99%, and rev
keeps 11%; a width-128 model sums too few delta entries per output for the rescaled noise to
average out. Its SFT deltas are ~20% of the weights (a 7B's are ~1%), so `inspect` warns on
them too. No merge of the three fine-tunes keeps any ability: each fine-tune rewrites the
shared output circuit. Tried by hand and not kept: fine-tuning with replay of the pretraining
mix (abilities kept per model, merges still fail), a lower learning rate (rev not learned),
task arithmetic of two (add + inc keeps inc at 98%, add falls to 16%).
"""
