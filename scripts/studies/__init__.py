"""The paper's evidence at small scale: Tables 2 and 3, Figure 4, equal compute and the long run,
and the t-SNE of Figure 5. `runner` trains and scores every job (resumable, one CSV row per run);
each study module only chooses its jobs and writes its tables and figures under `results/`.

May import the stages and `scripts.stages`; never `scripts.ops` or `scripts.bench`.
"""
