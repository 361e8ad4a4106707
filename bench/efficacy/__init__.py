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
"""
