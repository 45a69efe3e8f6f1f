"""Payload codecs and the serve config, without Ray."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest

from viscy.config import ConfigError, load_config
from viscy.serve.codecs import PayloadError, decode_image, encode_array, negotiate, parse_statistics
from viscy.serve.config import ServeConfig

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("accept", ["application/octet-stream", "application/x-npy", "image/tiff"])
@pytest.mark.parametrize("dtype", ["uint16", "float32"])
def test_encode_decode_round_trip(accept: str, dtype: str) -> None:
    arr = (np.arange(2 * 3 * 5 * 7) % 97).reshape(2, 3, 5, 7).astype(dtype)
    body, kind, headers = encode_array(arr, accept)
    back = decode_image(body, kind, headers["X-Dtype"], headers["X-Shape"])
    np.testing.assert_array_equal(back, arr)
    assert back.dtype == arr.dtype


def test_decode_refusals_name_the_problem() -> None:
    with pytest.raises(PayloadError, match="pickled") as exc:
        buf = io.BytesIO()
        np.save(buf, np.array([object()], dtype=object), allow_pickle=True)
        decode_image(buf.getvalue(), "application/x-npy")
    assert exc.value.status == 400
    with pytest.raises(PayloadError, match="bool"):
        buf = io.BytesIO()
        np.save(buf, np.zeros((4, 4), bool))
        decode_image(buf.getvalue(), "application/x-npy")
    with pytest.raises(PayloadError, match="npz"):
        buf = io.BytesIO()
        np.savez(buf, a=np.zeros(3))
        decode_image(buf.getvalue(), "application/x-npy")
    with pytest.raises(PayloadError, match="X-Shape"):
        decode_image(b"\0" * 8, "application/octet-stream", "float32", "0,2")


def test_negotiation_and_statistics() -> None:
    allowed = ("application/x-npy", "application/octet-stream", "image/tiff")
    assert negotiate(None, "image/tiff", allowed) == "image/tiff"
    assert negotiate("*/*", "image/png", allowed) == "application/x-npy"
    assert negotiate("image/jpeg, application/octet-stream;q=0.5", "x", allowed) == "application/octet-stream"
    with pytest.raises(PayloadError) as exc:
        negotiate("text/html", "x", allowed)
    assert exc.value.status == 406
    assert parse_statistics('{"Phase3D": {"median": 1, "iqr": 2}}') == {"Phase3D": {"median": 1.0, "iqr": 2.0}}
    with pytest.raises(PayloadError, match="map channel"):
        parse_statistics('{"Phase3D": 3}')


def test_shipped_ray_serve_config_is_a_viscy_config() -> None:
    config = load_config(ServeConfig, ROOT / "configs" / "serve.yaml", {"port": 9000, "stainer.num_gpus": 1})
    assert config.models == [Path("demo_output/model")]
    assert (config.host, config.port, config.app_name, config.route_prefix) == ("127.0.0.1", 9000, "viscy", "/")
    assert config.stainer.num_gpus == 1 and config.stainer.max_batch_size == 8  # override merged into args
    assert config.stainer.autoscaling.max_replicas == 2


def test_ray_serve_config_errors(tmp_path: Path) -> None:
    path = tmp_path / "serve.yaml"
    path.write_text("applications:\n  - name: x\n    import_path: other:app\n")
    with pytest.raises(ConfigError, match="viscy.serve.app:build_app"):
        load_config(ServeConfig, path)
    path.write_text("applications:\n  - import_path: viscy.serve.app:build_app\n    args: {models: [m]}\n"
                    "    deployments: [{name: VirtualStainer, num_replicas: 2}]\n")
    with pytest.raises(ConfigError, match="under the application's args"):
        load_config(ServeConfig, path)
    path.write_text("applications:\n  - import_path: viscy.serve.app:build_app\n    args: {models: [m], gpus: 1}\n")
    with pytest.raises(ConfigError, match="unknown key 'gpus'"):
        load_config(ServeConfig, path)


def test_a_network_bind_needs_a_token_or_an_explicit_flag(tmp_path: Path) -> None:
    from viscy.serve.config import is_loopback

    assert all(is_loopback(h) for h in ("127.0.0.1", "127.8.9.1", "::1", "[::1]", "localhost"))
    assert not any(is_loopback(h) for h in ("0.0.0.0", "::", "10.0.0.5", "example.org", ""))
    with pytest.raises(ConfigError, match="without a token") as err:
        load_config(ServeConfig, None, {"models": [str(tmp_path)], "host": "0.0.0.0"})
    assert "allow_unauthenticated_network" in str(err.value)
    assert load_config(ServeConfig, None, {"models": [str(tmp_path)], "host": "0.0.0.0",
                                           "auth_token_env": "TOKEN"}).host == "0.0.0.0"
    assert load_config(ServeConfig, None, {"models": [str(tmp_path)], "host": "0.0.0.0",
                                           "allow_unauthenticated_network": True}).allow_unauthenticated_network
    with pytest.raises(ConfigError, match="outside"):
        load_config(ServeConfig, None, {"models": [str(tmp_path)], "segmenter.diameter": 1000})
    with pytest.raises(ConfigError, match="above max_diameter"):
        load_config(ServeConfig, None, {"models": [str(tmp_path)], "segmenter.min_diameter": 50,
                                        "segmenter.max_diameter": 10})


def test_segmenter_settings_are_the_segmenter_schema_and_read_the_old_keys(tmp_path: Path) -> None:
    """``segmenter`` extends the schema of evaluate's and predict's segmenter (method, model, diameter, gpu);
    the old names default_method and cellpose_model are still read, with a warning naming the new ones."""
    from viscy.config import DeprecatedKeyWarning
    from viscy.segment.config import SegmenterConfig
    from viscy.serve.config import SegmenterSettings

    assert set(SegmenterConfig.model_fields) <= set(SegmenterSettings.model_fields)
    base = {"models": [str(tmp_path)]}
    with pytest.warns(DeprecatedKeyWarning) as warned:
        old = load_config(ServeConfig, None, {**base, "segmenter.cellpose_model": "cpsam",
                                              "segmenter.default_method": "cellpose", "segmenter.diameter": 20})
    assert sorted(str(w.message).split(";")[0] for w in warned) == [
        "config key 'segmenter.cellpose_model' is deprecated", "config key 'segmenter.default_method' is deprecated"]
    new = load_config(ServeConfig, None, {**base, "segmenter.model": "cpsam", "segmenter.method": "cellpose",
                                          "segmenter.diameter": 20})
    assert old.segmenter == new.segmenter
    assert new.segmenter.for_request(None, None) == SegmenterConfig(method="cellpose", model="cpsam", diameter=20)
    assert new.segmenter.for_request("classical", 9).diameter == 9
    with pytest.raises(ConfigError, match="set segmenter.model"):
        load_config(ServeConfig, None, {**base, "segmenter.method": "cellpose"})


def test_model_calls_count_z_windows_tiles_and_tta() -> None:
    from viscy.predict.tiling import TilingOptions, count_model_calls

    opts = TilingOptions(z_window_size=5, out_depth=1, yx_multiple=16, tile_yx=(512, 512), overlap=0.25)
    assert count_model_calls(1, (512, 512), opts) == 1
    assert count_model_calls(7, (2048, 2048), opts) == 7 * 25
    assert count_model_calls(3, (8, 8), opts) == 3
    assert count_model_calls(2, (1024, 1024), TilingOptions(tile_yx=(512, 512), overlap=0.0, tta="rot90")) == 32
