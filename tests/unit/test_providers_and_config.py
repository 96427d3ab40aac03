from __future__ import annotations

from pathlib import Path

import pytest

from app.config import Settings, SettingsError, build_parser, settings_from_args
from app.engine import providers as prov
from app.errors import ModelLoadError

GPU_BUILD = [prov.TENSORRT, prov.CUDA, prov.CPU]


def test_auto_prefers_tensorrt_then_cuda_then_cpu() -> None:
    assert prov.choose_providers(["auto"], GPU_BUILD) == GPU_BUILD
    assert prov.choose_providers(["auto"], [prov.CUDA, prov.CPU]) == [prov.CUDA, prov.CPU]
    assert prov.choose_providers(["auto"], [prov.CPU]) == [prov.CPU]


def test_explicit_list_is_honoured_in_order_and_missing_ones_are_errors() -> None:
    assert prov.choose_providers(["cuda", "cpu"], GPU_BUILD) == [prov.CUDA, prov.CPU]
    with pytest.raises(ModelLoadError, match="TensorrtExecutionProvider"):
        prov.choose_providers(["tensorrt", "cpu"], [prov.CUDA, prov.CPU])


def test_a_silent_fallback_is_refused_when_providers_were_named() -> None:
    with pytest.raises(ModelLoadError, match="CUDAExecutionProvider"):
        prov.missing_in_use([prov.CUDA, prov.CPU], [prov.CPU], explicit=True)
    assert prov.missing_in_use([prov.TENSORRT, prov.CUDA, prov.CPU], [prov.CUDA, prov.CPU],
                               explicit=False) == [prov.TENSORRT]


def test_tensorrt_options_have_fp16_cache_and_a_profile_for_every_batch(tmp_path: Path) -> None:
    opts = prov.GpuOptions(max_batch_size=8, input_height=640, input_width=640, trt_fp16=True,
                           trt_cache_dir=tmp_path, sizes_input="orig_target_sizes")
    trt = prov.tensorrt_options(opts)
    assert trt["trt_fp16_enable"] is True
    assert trt["trt_engine_cache_enable"] is True
    assert trt["trt_engine_cache_path"] == str(tmp_path)
    assert trt["trt_timing_cache_path"] == str(tmp_path)
    assert trt["trt_profile_min_shapes"] == "images:1x3x640x640,orig_target_sizes:1x2"
    assert trt["trt_profile_opt_shapes"] == "images:8x3x640x640,orig_target_sizes:8x2"
    assert trt["trt_profile_max_shapes"] == "images:8x3x640x640,orig_target_sizes:8x2"
    raw = prov.tensorrt_options(prov.GpuOptions(4, 320, 320, False, tmp_path, None,
                                                image_input="pixel_values"))
    assert raw["trt_profile_max_shapes"] == "pixel_values:4x3x320x320"
    specs = prov.provider_specs(GPU_BUILD, opts)
    assert [name for name, _ in specs] == GPU_BUILD
    assert specs[1][1]["device_id"] == 0 and specs[2][1] == {}


def test_settings_come_from_the_environment_and_flags_win(monkeypatch: pytest.MonkeyPatch
                                                          ) -> None:
    monkeypatch.setenv("DFINE_MAX_BATCH_SIZE", "4")
    monkeypatch.setenv("DFINE_PROVIDERS", "CUDA, cpu")
    assert Settings().max_batch_size == 4
    assert Settings().provider_list == ["cuda", "cpu"]
    settings = settings_from_args(["--max-batch-size", "2", "--no-trt-fp16", "--port", "9000"])
    assert (settings.max_batch_size, settings.trt_fp16, settings.port) == (2, False, 9000)


def test_every_setting_has_a_flag() -> None:
    flags = {a.dest for a in build_parser()._actions}
    assert set(Settings.model_fields) <= flags


@pytest.mark.parametrize("bad", ["gpu", "auto,cpu", ""])
def test_unknown_providers_are_rejected(bad: str) -> None:
    with pytest.raises(ValueError):
        Settings(providers=bad)


def test_a_bucket_session_gets_a_one_size_tensorrt_profile_and_cuda_graph_on_request(
        tmp_path: Path) -> None:
    opts = prov.GpuOptions(max_batch_size=32, input_height=640, input_width=640, trt_fp16=True,
                           trt_cache_dir=tmp_path, sizes_input="orig_target_sizes", bucket=4)
    trt = prov.tensorrt_options(opts)
    assert {trt[k] for k in ("trt_profile_min_shapes", "trt_profile_opt_shapes",
                             "trt_profile_max_shapes")} == {
        "images:4x3x640x640,orig_target_sizes:4x2"}
    assert "enable_cuda_graph" not in prov.cuda_options(opts)
    graph = prov.cuda_options(prov.GpuOptions(32, 640, 640, True, tmp_path, None,
                                              cuda_graph=True))
    assert graph["enable_cuda_graph"] == "1"
    assert graph["cudnn_conv_algo_search"] == "EXHAUSTIVE"


@pytest.mark.parametrize(("name", "bad"), [("precision", "fp8"), ("cuda_graph", "yes"),
                                           ("batch_buckets", "1,two")])
def test_gpu_settings_are_validated(name: str, bad: str) -> None:
    with pytest.raises(ValueError):
        Settings(**{name: bad})


def test_the_open_file_limit_is_raised_to_hold_the_connections() -> None:
    import resource

    from app.http_protocol import raise_open_file_limit

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    reachable = 4096 + 256 if hard == resource.RLIM_INFINITY else min(hard, 4096 + 256)
    now = raise_open_file_limit(4096)
    assert now == max(soft, reachable) == resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def test_help_lists_the_tools_and_a_bad_setting_names_its_flag_and_variable(
        monkeypatch: pytest.MonkeyPatch) -> None:
    text = build_parser().format_help()
    assert "dfine-serve bench" in text and "dfine-serve eval" in text
    with pytest.raises(SettingsError) as error:
        settings_from_args(["--max-queue", "0", "--providers", "gpu"])
    lines = sorted(str(error.value).splitlines())
    assert len(lines) == 2
    assert lines[0].startswith("--max-queue / DFINE_MAX_QUEUE: ") and "'0'" in lines[0]
    assert lines[1].startswith("--providers / DFINE_PROVIDERS: unknown provider")
    monkeypatch.setenv("DFINE_PORT", "eighty")
    with pytest.raises(SettingsError, match=r"^--port / DFINE_PORT: .*'eighty'"):
        settings_from_args([])


def test_the_eval_progress_bar_counts_images(capsys: pytest.CaptureFixture[str]) -> None:
    from app.bench.cli import ProgressBar

    bar = ProgressBar("eval", total=3, unit="images")
    for _ in range(3):
        bar(1)
    assert "3/3 images" in capsys.readouterr().err


def test_frontends_auto_is_one_process_on_a_cpu_and_several_on_a_gpu(
        monkeypatch: pytest.MonkeyPatch) -> None:
    import onnxruntime as ort

    from app.cli import resolve_frontends

    assert resolve_frontends(Settings(frontends=3)) == 3
    assert resolve_frontends(Settings(providers="cpu")) == 1
    # A GPU build, faked where onnxruntime is asked what it offers (this machine has none).
    monkeypatch.setattr(ort, "get_available_providers", lambda: [prov.CUDA, prov.CPU])
    monkeypatch.setattr("os.cpu_count", lambda: 16)
    assert resolve_frontends(Settings()) == 4
    monkeypatch.setattr("os.cpu_count", lambda: 2)
    assert resolve_frontends(Settings()) == 2
    assert resolve_frontends(Settings(providers="cpu")) == 1
