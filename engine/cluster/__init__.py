"""Running a plan on a Dask cluster: the blocks of a merge (or of many merges) as Dask tasks.

`tasks` holds what runs in the workers (a tensor's statistics, a band of blocks written in
place), `runner` what the driver does (the graph, the journal, the final checks) and `sweep` many
merges of the same inputs as one job. Dask is an optional dependency (`leanmerge[dask]`).
"""
