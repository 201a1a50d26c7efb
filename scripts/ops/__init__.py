"""Operations a user runs: the demo, the plan, the smoke run of every config, the status table,
the SLURM chain, the chaos test, and the setup script.

May import the stages and `scripts.stages`; never `scripts.studies` or `scripts.bench`.
"""
