"""Run inside a release pod that mounts the controller's volume (`kubectl exec -i <pod> -- python - < this file`):
where every pair of the controller's run ended, and what its curated dataset holds.

Reads the release's own config (SYNPREF_CONFIG) for the controller's store and dataset name, the pair store
(pairs.sqlite: every pair taken in, one pool each) and the `curated` dataset version the loop wrote, and
prints one JSON object: the size of each pool, the curated pools' pair ids and the dataset's row ids. Only
synpref's own dependencies are used: this runs in the project image, which holds no test code.
"""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow.parquet as pq

from synpref.services.controller.final_steps import CURATED
from synpref.services.controller.state import read_pools, read_records
from synpref.services.dataset_writer.dataset import manifest_files
from synpref.shared.config import load_settings

settings = load_settings()
controller = settings.controller
store = controller.store_dir or controller.workdir
pools = read_pools(store)
records = read_records(store)
curated_ids = [records[key].pair.id for pool in CURATED for key in pools[pool]]
files = manifest_files(Path(controller.workdir) / "datasets", controller.dataset_name, "curated")
row_ids = [i for f in files for i in pq.read_table(f, columns=["id"]).column("id").to_pylist()]
print(
    json.dumps(
        {
            "pools": {pool: len(keys) for pool, keys in pools.items()},
            "stored": len(records),
            "curated_ids": curated_ids,
            "row_ids": row_ids,
        }
    )
)
