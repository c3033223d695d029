"""The results store: one SQLite database (WAL) per study plus per-run artifact files.

:mod:`esa.store.db` is the writer (schema, crash-safe commits; only a driver writes), :mod:`esa.store.claims`
the leases that keep drivers sharing a database from computing a run twice, :mod:`esa.store.reader` the one
read-only reader (reports, exports, scaling fits, the Python API) and the CSV/Parquet export.
"""

from esa.store.claims import LEASE_SECONDS, LeaseKeeper, new_holder
from esa.store.db import MIGRATIONS, SCHEMA, RunRecord, Store, canonical_json, sha256_json, utc_now
from esa.store.reader import EXPORT_FORMATS, Reader, StoredRun, export, flatten_runs, study_names
from esa.store.sqlite import APPLICATION_ID, SCHEMA_VERSION, SQLITE_MAGIC

__all__ = ["APPLICATION_ID", "EXPORT_FORMATS", "LEASE_SECONDS", "MIGRATIONS", "SCHEMA", "SCHEMA_VERSION",
           "SQLITE_MAGIC", "LeaseKeeper", "Reader", "RunRecord", "Store", "StoredRun", "canonical_json", "export",
           "flatten_runs", "new_holder", "sha256_json", "study_names", "utc_now"]
