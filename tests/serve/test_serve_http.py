"""The HTTP API of the deployed application: endpoints, encodings, shapes, bad input, load, offline parity."""

from __future__ import annotations

import io
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import requests
import tifffile

from tests.serve.conftest import Server, phase_image, raw
from viscy.serve import ServeClient, ServeError
from viscy.serve.codecs import decode_npz

RAW = "application/octet-stream"


def npy(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, arr)
    return buf.getvalue()


def tiff(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    tifffile.imwrite(buf, arr)
    return buf.getvalue()


def png(arr: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def decode(r: requests.Response) -> np.ndarray:
    kind = r.headers["content-type"]
    if kind == RAW:
        return np.frombuffer(r.content, np.dtype(r.headers["x-dtype"])).reshape(
            tuple(int(v) for v in r.headers["x-shape"].split(","))
        )
    if kind == "image/tiff":
        return tifffile.imread(io.BytesIO(r.content))
    assert kind == "application/x-npy", kind
    return np.load(io.BytesIO(r.content), allow_pickle=False)


def expected_stain(models_dir: Path, name: str, image: np.ndarray) -> np.ndarray:
    """In-process reference: the model's normalisation, onnxruntime and the shared tiling engine."""
    from viscy.predict.backends import OnnxBackend
    from viscy.predict.tiling import TilingOptions, predict_plane_stack
    from viscy.serve.models import ServedModel

    model = ServedModel.load(models_dir / f"{name}.onnx")
    x, _ = model.normalize(model.as_czyx(image), None)
    opts = TilingOptions.for_model(model.card.spec, (512, 512), batch_size=8)
    out = predict_plane_stack(x, OnnxBackend(models_dir / f"{name}.onnx"), opts)
    return out[:, 0] if image.ndim == 2 else out


def test_serve_deploy_of_the_shipped_config_answers_healthz(server: Server) -> None:
    health = requests.get(f"{server.url}/healthz", timeout=10).json()
    assert health["status"] == "ok"
    assert sorted(health["models"]) == ["stain25d", "stain2d", "two_layer"]
    assert health["providers"]["stain2d"] == "CPUExecutionProvider"
    assert health["segmentation"] == ["classical", "cellpose"]
    assert health["auth"] is False
    print(f"serve deploy -> healthy in {server.deploy_seconds:.1f} s")


def test_models_describe_channels_depths_and_normalisation(server: Server) -> None:
    models = {m["name"]: m for m in ServeClient(server.url).models()}
    assert models["stain2d"]["source_channels"] == ["Phase3D"]
    assert models["stain2d"]["target_channels"] == ["Nuclei", "Membrane"]
    assert (models["stain25d"]["z_window_size"], models["stain25d"]["out_depth"]) == (3, 1)
    assert models["stain2d"]["yx_multiple"] == 8
    assert models["stain2d"]["normalization"][0]["subtrahend"] == "median"
    assert all("/" not in m["file"] for m in models.values())  # no server paths


@pytest.mark.parametrize("encoding", ["raw", "npy", "tiff", "png"])
def test_every_request_encoding_gives_the_in_process_result(server: Server, encoding: str) -> None:
    image = (phase_image((96, 80)) * 10).astype(np.uint8) if encoding == "png" else phase_image((96, 80))
    if encoding == "raw":
        body, headers = raw(image)
    else:
        body = {"npy": npy, "tiff": tiff, "png": png}[encoding](image)
        headers = {"Content-Type": {"npy": "application/x-npy", "tiff": "image/tiff", "png": "image/png"}[encoding]}
    r = requests.post(f"{server.url}/v1/stain", params={"model": "stain2d"}, data=body, headers=headers, timeout=60)
    assert r.status_code == 200, r.text
    got = decode(r)
    assert got.shape == (2, 96, 80) and got.dtype == np.float32
    assert r.headers["x-viscy-channels"] == "Nuclei,Membrane"
    assert r.headers["x-viscy-normalization"] == "image"
    np.testing.assert_allclose(got, expected_stain(server.models_dir, "stain2d", image), atol=1e-5)


@pytest.mark.parametrize("accept", [RAW, "application/x-npy", "image/tiff"])
def test_every_answer_encoding(server: Server, accept: str) -> None:
    image = phase_image((64, 72), seed=3)
    body, headers = raw(image)
    r = requests.post(f"{server.url}/v1/stain?model=stain2d", data=body, headers={**headers, "Accept": accept},
                      timeout=60)
    assert r.status_code == 200 and r.headers["content-type"] == accept
    np.testing.assert_allclose(decode(r), expected_stain(server.models_dir, "stain2d", image), atol=1e-5)
    assert "stain;dur=" in r.headers["server-timing"]


def test_a_bioimageio_package_is_served_as_bioimageio_core_predicts_it(server: Server) -> None:
    """A package made with bioimageio.spec alone: its own preprocessing, channels and sizes (here 96 x 80, and
    61 x 77, which it does not take as is), within 1e-4 of bioimageio.core's prediction."""
    from tests.bmz_helpers import core_prediction

    client = ServeClient(server.url)
    described = {m["name"]: m for m in client.models()}["two_layer"]
    assert described["format"] == "bioimageio" and described["target_channels"] == ["nuc", "mem"]
    image = phase_image((96, 80), seed=4) * 40 + 300
    out = client.stain(image, model="two_layer")
    assert out.channels == ["nuc", "mem"] and out.array.shape == (2, 96, 80)
    np.testing.assert_allclose(out.array, core_prediction(server.models_dir / "two_layer.zip", image), atol=1e-4,
                               rtol=1e-4)
    assert client.stain(image[:61, :77], model="two_layer").array.shape == (2, 61, 77)
    body, headers = raw(image)
    r = requests.post(f"{server.url}/v1/stain", params={"model": "two_layer", "denormalize": "true"}, data=body,
                      headers=headers, timeout=60)
    assert r.status_code == 422 and "its own postprocessing" in r.json()["detail"], r.text


def test_stacks_and_25d_windows(server: Server) -> None:
    client = ServeClient(server.url)
    stack = phase_image((4, 64, 64), seed=1)
    out = client.stain(stack, model="stain2d")
    assert out.array.shape == (2, 4, 64, 64)
    out4 = client.stain(stack[None], model="stain2d")
    np.testing.assert_allclose(out4.array, out.array, atol=1e-6)
    out25 = client.stain(stack, model="stain25d")
    assert out25.array.shape == (1, 4, 64, 64) and out25.channels == ["Nuclei"]
    np.testing.assert_allclose(out25.array, expected_stain(server.models_dir, "stain25d", stack), atol=1e-5)
    with pytest.raises(ServeError, match="reads 3 Z slices"):
        client.stain(stack[:2], model="stain25d")


def test_segment_and_stain_and_segment(server: Server) -> None:
    client = ServeClient(server.url)
    image = phase_image((96, 96), seed=2)
    masks = client.segment(image, method="classical", diameter=12)
    assert masks.shape == (96, 96) and masks.dtype == np.int32 and masks.max() > 0
    stack_masks = client.segment(np.stack([image, image]))
    assert stack_masks.shape == (2, 96, 96)
    # each slice on its own, ids unique in the stack (as viscy predict's 2d masks)
    second = stack_masks[1]
    np.testing.assert_array_equal(np.where(second > 0, second - stack_masks[0].max(), 0), stack_masks[0])
    both = client.stain_and_segment(image, model="stain2d", segment_channel="Membrane")
    assert both.stain.shape == (2, 96, 96) and both.masks.shape == (96, 96)
    assert both.channels == ["Nuclei", "Membrane"] and both.segmented == "Membrane"
    np.testing.assert_array_equal(both.masks, client.segment(both.stain[1]))
    # the page's answer: PNG previews and timings
    body, headers = raw(image)
    r = requests.post(f"{server.url}/v1/stain-and-segment?model=stain2d", data=body,
                      headers={**headers, "Accept": "application/json"}, timeout=60)
    preview = r.json()
    assert set(preview["images"]) == {"input", "Nuclei", "Membrane", "masks"}
    assert all(v.startswith("data:image/png;base64,") for v in preview["images"].values())
    assert preview["timing_ms"]["stain"] > 0
    # the .npz answer loads without pickles
    r = requests.post(f"{server.url}/v1/stain-and-segment?model=stain2d", data=body, headers=headers, timeout=60)
    assert r.headers["content-type"] == "application/x-npz"
    assert set(decode_npz(r.content)) == {"stain", "masks", "channels"}


def _bad_requests(url: str) -> list[tuple[str, dict, int, str]]:
    good = phase_image((32, 32))
    body, headers = raw(good)
    pickled = io.BytesIO()
    np.save(pickled, np.array([{"a": 1}], dtype=object), allow_pickle=True)
    nan = good.copy()
    nan[3, 3] = np.nan
    inf = good.copy()
    inf[0, 0] = np.inf
    big = np.zeros((6 * 1024 * 1024,), np.float32)  # 24 MiB, over the 20 MiB limit of the test config
    stain = f"{url}/v1/stain?model=stain2d"

    def chunks():
        for _ in range(24):
            yield b"\0" * (1024 * 1024)

    return [
        ("empty body", dict(url=stain, data=b"", headers={"Content-Type": RAW, "X-Dtype": "float32",
                                                               "X-Shape": "1,1"}), 400, "empty"),
        ("wrong content type", dict(url=stain, data=body, headers={"Content-Type": "text/plain"}), 415,
         "Content-Type"),
        ("unknown dtype", dict(url=stain, data=body, headers={**headers, "X-Dtype": "complex64"}), 415, "dtype"),
        ("not a dtype", dict(url=stain, data=body, headers={**headers, "X-Dtype": "pixels"}), 415, "X-Dtype"),
        ("shape/size mismatch", dict(url=stain, data=body, headers={**headers, "X-Shape": "32,31"}), 400, "X-Shape"),
        ("missing X-Shape", dict(url=stain, data=body, headers={"Content-Type": RAW, "X-Dtype": "float32"}), 400,
         "X-Shape"),
        ("five dimensions", dict(url=stain, data=body, headers={**headers, "X-Shape": "1,1,1,32,32"}), 422,
         "dimension"),
        ("wrong channel count", dict(url=stain, data=np.zeros((2, 1, 32, 32), np.float32).tobytes(),
                                     headers={**headers, "X-Shape": "2,1,32,32"}), 422, "channel"),
        ("too few Z for 2.5D", dict(url=f"{url}/v1/stain?model=stain25d", data=body, headers=headers), 422,
         "Z slices"),
        ("too small", dict(url=stain, data=np.zeros((4, 4), np.float32).tobytes(),
                           headers={**headers, "X-Shape": "4,4"}), 422, "too small"),
        ("corrupt npy", dict(url=stain, data=b"\x93NUMPY garbage", headers={"Content-Type": "application/x-npy"}),
         400, "corrupt .npy"),
        ("not npy at all", dict(url=stain, data=b"hello", headers={"Content-Type": "application/x-npy"}), 400,
         "corrupt .npy"),
        ("pickled npy", dict(url=stain, data=pickled.getvalue(), headers={"Content-Type": "application/x-npy"}),
         400, "pickled"),
        ("corrupt tiff", dict(url=stain, data=b"II*\0garbage", headers={"Content-Type": "image/tiff"}), 400,
         "image/tiff"),
        ("not a tiff", dict(url=stain, data=b"garbage", headers={"Content-Type": "image/tiff"}), 400, "TIFF"),
        ("NaN", dict(url=stain, data=nan.tobytes(), headers=headers), 422, "NaN"),
        ("inf", dict(url=stain, data=inf.tobytes(), headers=headers), 422, "infinite"),
        ("over the size limit", dict(url=stain, data=big.tobytes(), headers={**headers, "X-Shape": str(big.size)}),
         413, "limit"),
        ("over the limit, streamed", dict(url=stain, data=chunks(), headers={**headers, "X-Shape": "6291456"}),
         413, "limit"),
        ("unknown model", dict(url=f"{url}/v1/stain?model=nope", data=body, headers=headers), 404, "stain2d"),
        ("no model named", dict(url=f"{url}/v1/stain", data=body, headers=headers), 400, "?model="),
        ("unacceptable answer", dict(url=stain, data=body, headers={**headers, "Accept": "image/jpeg"}), 406,
         "image/jpeg"),
        ("bad statistics", dict(url=stain, data=body, headers={**headers, "X-Viscy-Statistics": "{median"}), 400,
         "X-Viscy-Statistics"),
        ("denormalize without target statistics", dict(url=f"{stain}&denormalize=true", data=body,
                                                        headers=headers), 422, "denormalize"),
        ("unserved segmentation method", dict(url=f"{url}/v1/segment?method=watershed", data=body,
                                              headers=headers), 400, "watershed"),
        ("negative diameter", dict(url=f"{url}/v1/segment?diameter=-3", data=body, headers=headers), 422,
         "diameter"),
        ("unknown segment channel", dict(url=f"{url}/v1/stain-and-segment?model=stain2d&segment_channel=DAPI",
                                         data=body, headers=headers), 422, "DAPI"),
    ]


def test_bad_input_gets_a_4xx_that_names_it_and_the_next_request_succeeds(server: Server) -> None:
    good_body, good_headers = raw(phase_image((32, 32)))
    cases = _bad_requests(server.url)
    assert len(cases) >= 12
    for what, kwargs, status, fragment in cases:
        r = requests.post(timeout=60, **kwargs)
        assert r.status_code == status, f"{what}: {r.status_code} {r.text}"
        assert r.headers["content-type"] == "application/json", what
        assert fragment in r.json()["detail"], f"{what}: {r.json()['detail']}"
        ok = requests.post(f"{server.url}/v1/stain?model=stain2d", data=good_body, headers=good_headers, timeout=60)
        assert ok.status_code == 200, f"after {what}: {ok.status_code} {ok.text}"


def test_unknown_route_and_docs(server: Server) -> None:
    assert requests.get(f"{server.url}/v2/stain", timeout=10).status_code == 404
    spec = requests.get(f"{server.url}/openapi.json", timeout=10).json()
    assert {"/v1/stain", "/v1/segment", "/v1/stain-and-segment", "/v1/models", "/healthz"} <= set(spec["paths"])
    assert "application/x-npy" in spec["paths"]["/v1/stain"]["post"]["requestBody"]["content"]
    assert requests.get(f"{server.url}/docs", timeout=10).status_code == 200
    page = requests.get(f"{server.url}/", timeout=10)
    assert page.status_code == 200 and "v1/stain-and-segment" in page.text


def test_300_requests_at_concurrency_8_without_errors(server: Server) -> None:
    images = [phase_image((256, 256), seed=s) for s in range(4)]

    def one(i: int) -> int:
        body, headers = raw(images[i % 4])
        with requests.Session() as s:
            r = s.post(f"{server.url}/v1/stain?model=stain2d", data=body, headers={**headers, "Accept": RAW},
                       timeout=120)
        assert r.status_code == 200 and len(r.content) == 2 * 256 * 256 * 4
        return r.status_code

    with ThreadPoolExecutor(8) as pool:
        statuses = list(pool.map(one, range(300)))
    assert statuses.count(200) == 300


def test_2048_image_through_tiling_equals_offline_predict(server: Server, tmp_path: Path) -> None:
    from tests.conftest import write_iohub_plate
    from viscy import api
    from viscy.data.plate import Plate

    plate_path = write_iohub_plate(tmp_path / "big.zarr", shape=(1, 1, 1, 2048, 2048), positions=(("A", "1", "0"),),
                                   channel_names=("Phase3D",))
    api.preprocess(data_path=plate_path, num_cpus_per_task=0.2)
    result = api.predict(onnx=server.models_dir / "stain2d.onnx", data_path=plate_path, output=tmp_path / "pred.zarr",
                         tile_yx=[512, 512], batch_size=8, num_cpus_per_actor=0.25, use_gpu=False, progress=False)
    with Plate(result.outputs[0]) as pred, Plate(plate_path) as src:
        offline = pred.read("A/1/0", 0, pred.channel_indices(["Nuclei_prediction", "Membrane_prediction"]))[:, 0]
        image = src.read("A/1/0", 0, [0])[0, 0]
        stats = src.normalization("A/1/0")["Phase3D"]["fov_statistics"]
    served = ServeClient(server.url).stain(image, model="stain2d", statistics={"Phase3D": stats})
    assert served.normalization == "request"
    assert served.array.shape == offline.shape == (2, 2048, 2048)
    np.testing.assert_allclose(served.array, offline, atol=1e-5, rtol=0)


def test_stain_and_segment_equals_the_masks_viscy_predict_writes(server: Server, tmp_path: Path) -> None:
    """One FOV (a Z stack), one model, one segmentation setting: serve's masks are the label image of predict.

    Serve gets the FOV's stored statistics (sources, and targets to denormalise as predict does), the
    classical segmenter and its diameter; the 2.5D model reads Z windows of the whole stack in both paths."""
    from tests.conftest import write_iohub_plate
    from viscy import api
    from viscy.data.plate import Plate

    fov, masks = "A/1/0", "Nuclei_prediction_masks"
    plate_path = write_iohub_plate(tmp_path / "seg.zarr", shape=(1, 3, 5, 64, 64), positions=(("A", "1", "0"),))
    api.preprocess(data_path=plate_path, grid_spacing=1, num_cpus_per_task=0.2)
    t0 = time.monotonic()
    result = api.predict(onnx=server.models_dir / "stain25d.onnx", data_path=plate_path, output=tmp_path / "p.zarr",
                         denormalize=True, num_cpus_per_actor=0.25, use_gpu=False, progress=False,
                         segment={"method": "classical", "diameter": 8, "num_cpus_per_actor": 0.25})
    predict_s = time.monotonic() - t0
    with Plate(result.outputs[0]) as pred, Plate(plate_path) as src:
        offline = pred.read(fov, 0, array=pred.label_key(fov, masks))[0]
        offline_stain = pred.read(fov, 0, pred.channel_indices(["Nuclei_prediction"]))[0]
        image = src.read(fov, 0, src.channel_indices(["Phase3D"]))[0]
        stats = {ch: levels["fov_statistics"] for ch, levels in src.normalization(fov).items()}
    t0 = time.monotonic()
    served = ServeClient(server.url).stain_and_segment(image, model="stain25d", method="classical", diameter=8,
                                                        statistics=stats, denormalize=True)
    serve_s = time.monotonic() - t0
    print(f"predict --segment: {predict_s:.1f} s; stain-and-segment: {serve_s:.2f} s; {offline.max()} objects")
    assert served.segmented == "Nuclei" and served.masks.shape == offline.shape == (5, 64, 64)
    np.testing.assert_array_equal(served.stain[0], offline_stain)  # the same engine, the same float32 values
    assert all(plane.max() > 0 for plane in offline)
    np.testing.assert_array_equal(served.masks, offline)


def test_denormalize_with_sent_statistics(server: Server) -> None:
    from viscy.data.patches import EPS

    client = ServeClient(server.url)
    image = phase_image((64, 64), seed=5)
    stats = {"Phase3D": {"median": 5.0, "iqr": 2.0}, "Nuclei": {"median": 100.0, "iqr": 40.0},
             "Membrane": {"median": 300.0, "iqr": 10.0}}
    normalised = client.stain(image, model="stain2d", statistics=stats)
    raw_units = client.stain(image, model="stain2d", statistics=stats, denormalize=True)
    assert normalised.normalization == "request"
    for i, ch in enumerate(["Nuclei", "Membrane"]):
        expected = normalised.array[i] * (stats[ch]["iqr"] + EPS) + stats[ch]["median"]
        np.testing.assert_allclose(raw_units.array[i], expected, rtol=1e-5)
    sent_normalised = client.stain(((image - 5.0) / (2.0 + EPS)).astype(np.float32), model="stain2d",
                                   normalize=False)
    np.testing.assert_allclose(sent_normalised.array, normalised.array, atol=1e-5)


def test_a_full_queue_answers_503_with_retry_after_and_then_serves(server: Server) -> None:
    """4 requests in the Ingress and 8 queued (the test config): the rest are refused at once, not left to hang."""
    body, headers = raw(phase_image((1024, 1024), seed=5))

    def post(_: int) -> requests.Response:
        return requests.post(f"{server.url}/v1/stain?model=stain2d", data=body, headers=headers, timeout=300)

    with ThreadPoolExecutor(24) as pool:
        answers = list(pool.map(post, range(24)))
    statuses = sorted(r.status_code for r in answers)
    busy = [r for r in answers if r.status_code == 503]
    assert set(statuses) <= {200, 503} and busy and statuses.count(200) >= 4, statuses
    assert all(r.headers.get("retry-after") == "5" for r in busy), busy[0].headers
    assert post(0).status_code == 200


def test_an_abandoned_request_stops_costing_the_segmenter(server: Server) -> None:
    """A client that leaves mid-request: the segmenter stops before its next plane, so the next request waits
    for one plane, not for the whole stack the first one sent."""
    import socket
    from urllib.parse import urlsplit

    phase = phase_image((8, 1024, 1024), seed=7)  # uint16, so that 8 planes fit the test's 20 MiB body limit
    stack = np.clip(phase * 1000 + 20000, 0, 65535).astype(np.uint16)
    body, headers = raw(stack)
    url = f"{server.url}/v1/segment?method=classical"
    t0 = time.monotonic()
    assert requests.post(url, data=body, headers=headers, timeout=300).status_code == 200
    whole = time.monotonic() - t0
    one_body, one_headers = raw(stack[0])

    host = urlsplit(server.url)
    with socket.create_connection((host.hostname, host.port), timeout=10) as sock:
        head = "".join(f"{k}: {v}\r\n" for k, v in headers.items())
        sock.sendall(f"POST {urlsplit(url).path}?{urlsplit(url).query} HTTP/1.1\r\nHost: {host.netloc}\r\n{head}"
                     f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n".encode() + body)
        time.sleep(whole / 4)  # the segmenter is inside the stack now
    t0 = time.monotonic()
    assert requests.post(url, data=one_body, headers=one_headers, timeout=300).status_code == 200
    after = time.monotonic() - t0
    print(f"8 planes: {whole:.1f} s; one plane right after an abandoned 8-plane request: {after:.1f} s")
    assert after < whole / 2, f"the abandoned request kept the segmenter busy: {after:.1f} s of {whole:.1f} s"
