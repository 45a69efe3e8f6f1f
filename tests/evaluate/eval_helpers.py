"""Helpers of the evaluation tests: synthetic plates with fake predictions appended."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from scipy import ndimage as ndi

from viscy.data.config import SynthConfig
from viscy.data.synth import write_synthetic_plate


def fake_prediction(target: np.ndarray, rng: np.random.Generator, blur: float = 1.0, noise: float = 0.1) -> np.ndarray:
    """A plausible prediction: the target blurred in Y and X plus Gaussian noise (relative to its std)."""
    sigma = (0,) * (target.ndim - 2) + (blur, blur)
    out = ndi.gaussian_filter(target.astype(np.float32), sigma)
    return (out + rng.normal(0, noise * float(target.std()), target.shape)).astype(np.float32)


def add_predictions(
    path: Path, channels: tuple[str, ...] = ("Nuclei", "Membrane"), blur: float = 1.0, noise: float = 0.1, seed: int = 0
) -> Path:
    """Append ``<channel>_prediction`` channels (blurred, noisy copies of the targets) to every position."""
    from iohub.ngff import open_ome_zarr

    rng = np.random.default_rng(seed)
    with open_ome_zarr(path, layout="hcs", mode="r+") as plate:
        for _, pos in plate.positions():
            names = list(pos.channel_names)
            for ch in channels:
                pos.append_channel(f"{ch}_prediction")
                img = pos["0"]
                img[:, len(names)] = fake_prediction(np.asarray(img[:, names.index(ch)]), rng, blur, noise)
                names.append(f"{ch}_prediction")
    return path


def synth_plate(path: Path, yx: tuple[int, int] = (96, 96), z: int = 1, fovs: int = 2, t: int = 1) -> Path:
    """A small synthetic plate (one well) with Phase3D, Nuclei, Membrane and nuclei/cells labels."""
    config = SynthConfig(output=path, yx=yx, z=z, t=t, cols=["1"], fovs_per_well=fovs, seed=3)
    return write_synthetic_plate(config)


def write_prediction_masks(
    store: Path,
    position: str,
    channel: str,
    masks: np.ndarray,
    *,
    method: str = "classical",
    model: str | None = None,
    diameter: float | None = None,
    dims: str = "2d",
    complete: bool = True,
    record: bool = True,
) -> None:
    """Write (or replace) ``<position>/labels/<channel>_masks`` of an NGFF 0.4 store the way `viscy predict` does.

    ``masks`` is (T, 1, Z, Y, X); the label group gets the image's axes and scale, ``image-label`` and (unless
    ``record`` is false) ``viscy_segmentation``; the name is added to ``labels/.zattrs`` next to the others.
    """
    import zarr

    image = zarr.open_group(str(store / position), mode="r+")
    labels = image.require_group("labels")
    name = f"{channel}_masks"
    names = list(labels.attrs.get("labels", []))
    labels.attrs["labels"] = names if name in names else [*names, name]
    group = labels.create_group(name, overwrite=True)
    group.create_dataset("0", data=masks.astype(np.int32), chunks=(1, 1, 1, *masks.shape[-2:]))
    level0 = image.attrs["multiscales"][0]
    transforms = level0["datasets"][0]["coordinateTransformations"]
    attrs = {
        "multiscales": [
            {
                "version": "0.4",
                "name": name,
                "axes": level0["axes"],
                "datasets": [{"path": "0", "coordinateTransformations": transforms}],
            }
        ],
        "image-label": {"version": "0.4", "source": {"image": "../../"}},
    }
    if record:
        attrs["viscy_segmentation"] = {
            "channel": channel, "method": method, "model": model, "diameter": diameter, "dims": dims,
            "complete": complete,
        }
    group.attrs.update(attrs)
