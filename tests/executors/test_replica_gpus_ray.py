"""``--num-gpus 2 --replicas 2`` on a Ray cluster of 4 (logical) GPUs: each replica is given 2 GPUs of its own, as
a model sharded over 2 GPUs inside each replica needs (``make test-ray``).

Ray hands an actor its GPUs through ``CUDA_VISIBLE_DEVICES``, and ESA records that variable in every run's
provenance. The GPUs here are logical (declared to Ray), so torch sees no CUDA and the tiny model runs on the CPU;
that a process seeing 2 GPUs loads with ``device_map="auto"`` is tested in tests/models/test_models.py.
"""

import pytest

from esa.executors import run_study
from esa.store import Store
from esa.study import parse_study

pytestmark = pytest.mark.ray


@pytest.fixture(scope="module")
def ray():
    ray = pytest.importorskip("ray")
    ray.init(num_cpus=2, num_gpus=4, include_dashboard=False, ignore_reinit_error=True,
             runtime_env={"env_vars": {"OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}})
    yield ray
    ray.shutdown()


def test_each_replica_gets_its_own_two_gpus(ray, tiny_study_dir, tmp_path):
    study = {"name": "gpus", "models": [str(tiny_study_dir / "model")],
             "datasets": [str(tiny_study_dir / "corpus.txt")], "context_lens": [32], "seeds": [0, 1, 2, 3],
             "max_eval_tokens": 256, "batch_tokens": 64}
    summary = run_study(parse_study(study), tmp_path / "g.db", executor="ray", replicas=2, num_gpus=2, num_cpus=1)
    assert summary.ok and summary.completed == 4, summary
    with Store(tmp_path / "g.db") as store:
        frame = store.runs_frame("gpus")
    visible = set(frame["provenance.cuda_visible_devices"])
    assert (frame["provenance.data_parallel.replicas"] == 2).all()
    given = [ids.split(",") for ids in visible]  # of whichever replica finished each run first
    assert all(len(gpus) == len(set(gpus)) == 2 and set(gpus) <= {"0", "1", "2", "3"} for gpus in given)
    assert len({g for gpus in given for g in gpus}) == 2 * len(given)  # two replicas never share a GPU
