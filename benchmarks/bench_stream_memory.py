"""Memory of the training patch stream does not grow with the plate: evidence for larger-than-RAM plates.

Streams every FOV of synthetic plates of increasing size through the Ray Data training source
(``viscy.train.datasource``) with Ray's object store capped far below the plate size, sampling the unique
memory (USS) of every process of the local Ray cluster. Prints plate size, patches streamed, and the peak
USS of the largest single process and of all processes together, per plate.

``python benchmarks/bench_stream_memory.py --fovs 2 8 32 --yx 1024 --z 8`` (the defaults)
"""

from __future__ import annotations

import argparse
import tempfile
import threading
import time
from pathlib import Path

import psutil

from viscy.data.config import DataConfig, PreprocessConfig, SynthConfig
from viscy.data.preprocess import run_preprocess
from viscy.data.synth import write_synthetic_plate


def _cluster_processes() -> list[psutil.Process]:
    """This process and its descendants: with ``address="local"`` that is the whole Ray cluster."""
    me = psutil.Process()
    return [me, *me.children(recursive=True)]


class PeakRss:
    """Samples the unique memory (USS: not shared pages such as the object store mapping) of the cluster."""

    def __init__(self) -> None:
        self.max_single = 0
        self.max_total = 0
        self.procs_at_max_total = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            rss = []
            for p in _cluster_processes():
                try:
                    rss.append(p.memory_full_info().uss)
                except psutil.Error:
                    pass
            self.max_single = max(self.max_single, max(rss, default=0))
            if sum(rss) > self.max_total:
                self.max_total, self.procs_at_max_total = sum(rss), len(rss)
            time.sleep(0.2)

    def __enter__(self) -> PeakRss:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def stream_plate(n_fovs: int, yx: int, z: int, tmp: Path, object_store_mb: int) -> dict[str, float]:
    import ray
    from ray.data import DataContext

    from viscy.train.datasource import patch_dataset, plan_reads

    cfg = SynthConfig(output=tmp / f"plate_{n_fovs}.zarr", cols=["1"], fovs_per_well=n_fovs, z=z, yx=(yx, yx))
    path = write_synthetic_plate(cfg)
    ray.init(
        address="local",
        num_cpus=2,
        object_store_memory=object_store_mb * 2**20,
        include_dashboard=False,
        logging_level="ERROR",
    )
    run_preprocess(PreprocessConfig(data_path=path), progress=False)
    DataContext.get_current().op_resource_reservation_enabled = False
    DataContext.get_current().enable_progress_bars = False
    data = DataConfig(
        data_path=[path], z_window_size=5, target_2d=False, yx_patch_size=(256, 256), patches_per_stack=8, batch_size=8
    )
    fovs = [(str(path), f"A/1/{i}") for i in range(n_fovs)]
    reads = plan_reads(fovs, data.patches_per_stack, reads_per_fov=2)
    n = 0
    with PeakRss() as peak:
        for batch in patch_dataset(reads, data, augment=False).iter_torch_batches(batch_size=8):
            n += batch["source"].shape[0]
    ray.shutdown()
    return {
        "plate_gb": n_fovs * 3 * z * yx * yx * 4 / 1e9,
        "patches": n,
        "max_process_mb": peak.max_single / 2**20,
        "max_total_mb": peak.max_total / 2**20,
        "processes": peak.procs_at_max_total,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--fovs", type=int, nargs="+", default=[2, 8, 32], help="plate sizes (FOVs) to compare")
    parser.add_argument("--yx", type=int, default=1024)
    parser.add_argument("--z", type=int, default=8)
    parser.add_argument("--object-store-mb", type=int, default=256, help="Ray object store cap")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        for n in args.fovs:
            r = stream_plate(n, args.yx, args.z, Path(tmp), args.object_store_mb)
            print(
                f"plate {r['plate_gb']:.2f} GB ({n} FOVs, uncompressed), object store cap {args.object_store_mb} MB: "
                f"{r['patches']} patches streamed; peak USS largest process {r['max_process_mb']:.0f} MB, "
                f"all {r['processes']} processes {r['max_total_mb']:.0f} MB"
            )


if __name__ == "__main__":
    main()
