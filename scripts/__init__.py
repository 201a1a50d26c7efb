"""The programs around the pipeline's stages, one room per purpose.

- `scripts.ops`: what a user runs to do the job (`make demo`, `plan`, `smoke`, `status`,
  `slurm-ensemble`, `chaos`, the setup script).
- `scripts.studies`: the paper's evidence on the embedded benchmark (`make ablation`, `sweep`,
  `long-run`, `tsne`), all through one runner.
- `scripts.bench`: measurements (`make bench`, `bench-data`, `gpu-check`); each prints ratios
  measured side by side in one run.

Every room builds on the stages (`data_prep`, `train`, `ensemble`, `common`) and on
`scripts.stages` (the stages driven as subprocesses); none imports a stage's caller.
"""
