"""What the CUDA paths do, checked on CPU (docs/DESIGN.md §10-12): the mixed-precision dtype on
GPUs with emulated bf16, resuming a GradScaler across AMP modes, CUDA RNG states of this
process's device only, the process group's timeout and device, a quantizer forward without
host reads, per-rank dropout streams, the adaptive weight under loss scaling, spectral norm
in fp32 under autocast, checked() after the step, inference precision and bench_gpu.py."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

import pytest
import torch
from conftest import GAN_TINY, ROOT

import miscc.training as training
import miscc.utils as utils
from miscc.config import load_config

pytestmark = pytest.mark.usefixtures("one_thread")
CPU = torch.device("cpu")


def gan_cfg(data_dir: Path, encoder: Path, out: Path, *overrides: str):
    return load_config(ROOT / "cfg" / "clip_shapes_DMGAN.yml",
                       [f"DATA_DIR={data_dir}", f"OUTPUT_DIR={out}", f"TRAIN.NET_E={encoder}",
                        *GAN_TINY, *overrides], quiet=True)


# --------------------------------------------------------------------- precision, scaler
def test_emulated_bf16_gets_fp16_with_loss_scaling(monkeypatch) -> None:
    """A GPU whose bf16 is only emulated (V100, T4) trains in fp16 (the GradScaler's dtype);
    one with native bf16 in bf16."""
    native = {"value": False}

    def is_bf16_supported(including_emulation: bool = True) -> bool:
        return True if including_emulation else native["value"]

    monkeypatch.setattr(torch.cuda, "is_bf16_supported", is_bf16_supported)
    cfg = load_config(None, ["TRAIN.AMP=True"], quiet=True)
    with pytest.warns(UserWarning):  # no CUDA here: the GradScaler disables itself
        amp, dtype, _ = training.mixed_precision(cfg, torch.device("cuda", 0))
    assert amp and dtype == torch.float16
    native["value"] = True
    assert training.amp_dtype(torch.device("cuda", 0)) == torch.bfloat16
    assert training.amp_dtype(CPU) == torch.float16  # never autocast on CPU anyway


def test_empty_scaler_state_resumes_into_an_enabled_scaler() -> None:
    """A state saved by a disabled GradScaler (bf16, CPU, AMP off) is empty; an enabled one
    (fp16 on another GPU type) starts from its initial scale instead of failing."""
    saved = torch.amp.GradScaler("cpu", enabled=False).state_dict()
    assert saved == {}
    enabled = torch.amp.GradScaler("cpu", enabled=True, init_scale=2.0**10)
    training.load_scaler_state(enabled, saved)
    assert enabled.get_scale() == 2.0**10
    # an enabled scaler's state still loads, and a disabled one ignores it
    other = torch.amp.GradScaler("cpu", enabled=True, init_scale=8.0)
    other.scale(torch.ones(()))  # the scale tensor exists once something was scaled
    training.load_scaler_state(enabled, other.state_dict())
    assert enabled.get_scale() == 8.0
    training.load_scaler_state(torch.amp.GradScaler("cpu", enabled=False), other.state_dict())


def test_trainer_resumes_a_cpu_state_with_fp16_loss_scaling(data_dir, tiny_encoder_ckpt,
                                                            tmp_path, monkeypatch) -> None:
    """Stage 2 written with a disabled scaler, resumed by a trainer whose scaler is enabled."""
    from trainer import GANTrainer

    out = tmp_path / "run"
    GANTrainer(gan_cfg(data_dir, tiny_encoder_ckpt, out, "TRAIN.MAX_STEPS=1"), CPU,
               progress=False).train()
    monkeypatch.setattr(training, "mixed_precision", lambda cfg, device: (
        False, torch.float16, torch.amp.GradScaler("cpu", enabled=True)))
    resumed = GANTrainer(gan_cfg(data_dir, tiny_encoder_ckpt, out, "TRAIN.MAX_STEPS=2"), CPU,
                         progress=False)
    assert resumed.step == 1 and resumed.scaler.is_enabled()
    assert resumed.scaler.get_scale() == 2.0**16


def test_amp_cpu_trains_stage2_under_cpu_bf16_autocast(data_dir, tiny_encoder_ckpt,
                                                       tmp_path, monkeypatch) -> None:
    """TRAIN.AMP_CPU: a stage-2 step runs G's forward under CPU bf16 autocast (its images come
    out bf16) and finishes without a loss scaler; without the key the same step is fp32."""
    from trainer import GANTrainer

    monkeypatch.setattr(training, "cpu_has_bf16", lambda: True)  # emulated where it is not
    for on in (True, False):
        cfg = gan_cfg(data_dir, tiny_encoder_ckpt, tmp_path / str(on), "TRAIN.MAX_STEPS=1",
                      f"TRAIN.AMP_CPU={on}")
        trainer = GANTrainer(cfg, CPU, progress=False)
        dtypes: list[torch.dtype] = []
        trainer.netG.register_forward_hook(
            lambda m, i, out, seen=dtypes: seen.append(out[0][-1].dtype))
        trainer.train()
        assert dtypes == [torch.bfloat16 if on else torch.float32]
        assert trainer.step == 1 and not trainer.scaler.is_enabled()


# --------------------------------------------------------------------------- CUDA RNG
class FakeCuda:
    """torch.cuda's RNG functions for `visible` devices, this process on `current`."""

    def __init__(self, monkeypatch, visible: int, current: int) -> None:
        self.visible, self.current, self.set_calls = visible, current, []
        for module in (torch.cuda, torch.cuda.random):
            monkeypatch.setattr(module, "set_rng_state", self.set_rng_state)
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
        monkeypatch.setattr(torch.cuda, "device_count", lambda: visible)
        monkeypatch.setattr(torch.cuda, "current_device", lambda: current)
        monkeypatch.setattr(torch.cuda, "get_rng_state",
                            lambda device="cuda": torch.full((16,), 7, dtype=torch.uint8))
        monkeypatch.setattr(torch.cuda, "get_rng_state_all", lambda: [
            torch.full((16,), d, dtype=torch.uint8) for d in range(visible)])

    def set_rng_state(self, state: torch.Tensor, device="cuda") -> None:
        index = {"cuda": self.current}.get(device, device)
        index = index.index if isinstance(index, torch.device) else int(index)
        if index >= self.visible:
            raise IndexError(f"no CUDA device {index}")
        self.set_calls.append((index, int(state[0])))


def test_cuda_rng_state_is_this_devices_and_old_lists_restore(monkeypatch) -> None:
    """The resume state holds this process's device's CUDA RNG state; a state of an earlier
    version (one entry per device of the machine that saved it) restores the entry of this
    process's device, also when fewer devices are visible now than when it was saved."""
    fake = FakeCuda(monkeypatch, visible=2, current=1)
    state = utils.rng_state()
    assert isinstance(state["cuda"], torch.Tensor) and int(state["cuda"][0]) == 7
    utils.set_rng_state(state)
    assert fake.set_calls == [(1, 7)]  # device 1 only, with the saved state

    old = {**state, "cuda": [torch.full((16,), d, dtype=torch.uint8) for d in range(4)]}
    fake = FakeCuda(monkeypatch, visible=1, current=0)  # saved on 4 GPUs, resumed on 1
    utils.set_rng_state(old)
    assert fake.set_calls == [(0, 0)]
    fake = FakeCuda(monkeypatch, visible=2, current=1)  # LOCAL_RANK 1 takes entry 1
    utils.set_rng_state(old)
    assert fake.set_calls == [(1, 1)]


# -------------------------------------------------------------------------- process group
@pytest.mark.parametrize("gpu", [-1, 0])
def test_process_group_gets_timeout_and_device(monkeypatch, gpu: int) -> None:
    """Under torchrun, init_process_group gets DIST_TIMEOUT_MINUTES and, on CUDA, this
    process's device (LOCAL_RANK)."""
    import torch.distributed as dist

    calls = []
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setattr(dist, "is_initialized", lambda: False)
    monkeypatch.setattr(dist, "init_process_group", lambda **kw: calls.append(kw))
    monkeypatch.setattr(dist, "get_rank", lambda: 1)
    monkeypatch.setattr(dist, "get_world_size", lambda: 2)
    monkeypatch.setattr(utils, "select_device", lambda i: torch.device("cuda", i))
    before = torch.get_num_threads()
    cfg = load_config(None, [f"GPU_ID={gpu}", "DIST_TIMEOUT_MINUTES=90"], quiet=True)
    rank, world, device = training.start_process(cfg)
    torch.set_num_threads(before)
    assert (rank, world) == (1, 2)
    assert len(calls) == 1 and calls[0]["timeout"] == timedelta(minutes=90)
    if gpu < 0:
        assert device == CPU and calls[0]["backend"] == "gloo" and "device_id" not in calls[0]
    else:
        assert calls[0]["backend"] == "nccl"
        assert calls[0]["device_id"] == device == torch.device("cuda", 1)
    assert load_config(None, [], quiet=True).DIST_TIMEOUT_MINUTES == 60.0


# ------------------------------------------------------------------------------ quantizer
def test_quantizer_forward_reads_no_buffer_after_initialisation(monkeypatch) -> None:
    """After the codebook's initialisation (or a load of an initialised state, also through a
    parent module), a training forward reads nothing back from the device: no bool()/item()
    of a tensor (each one a host sync on CUDA)."""
    from clipgen.quantizer import VectorQuantizer

    torch.manual_seed(0)
    q = VectorQuantizer(16, 4).train()
    z = torch.randn(2, 4, 3, 3)
    q(z)
    assert bool(q.initialized)
    fresh = torch.nn.Sequential(VectorQuantizer(16, 4)).train()
    fresh.load_state_dict(torch.nn.Sequential(q).state_dict())

    def no_read(*args, **kwargs):
        raise AssertionError("a tensor was read on the host in forward")

    codes = q.embedding.weight.clone()
    with monkeypatch.context() as m:
        m.setattr(torch.Tensor, "__bool__", no_read)
        m.setattr(torch.Tensor, "item", no_read)
        q(z)
        fresh[0](z)
    assert torch.equal(fresh[0].embedding.weight, codes)  # loaded as initialised: not re-seeded
    # loading an uninitialised state makes the next training forward initialise again
    fresh[0].load_state_dict(VectorQuantizer(16, 4).state_dict())
    fresh[0](z)
    assert bool(fresh[0].initialized) and not torch.equal(fresh[0].embedding.weight, codes)


# ------------------------------------------------------------------------ per-rank dropout
class DropoutTrainer(training.EpochTrainer):
    """The shared loop around a step that only draws a dropout mask (2 steps, one epoch)."""

    def __init__(self, cfg, rank: int, world: int) -> None:
        super().__init__(cfg, CPU, rank, world, progress=False)
        self.sampler = training.EpochSampler(4 * world, 2, int(cfg.SEED), rank, world)
        self.loader = [0, 1]
        self.masks: list[torch.Tensor] = []

    def train_step(self, batch) -> dict[str, float]:
        self.masks.append(torch.nn.functional.dropout(torch.ones(256), 0.5) == 0)
        return self.checked({"loss": torch.zeros(())})


def test_ranks_draw_different_dropout_masks_and_resume_draws_the_same(tmp_path) -> None:
    """Under torchrun (rank 0 and 1, seeded alike at the start as start_process does), the
    ranks' dropout masks differ; each rank's masks depend only on (SEED, rank, step)."""
    def masks(rank: int, world: int = 2, **kw) -> list[torch.Tensor]:
        cfg = load_config(None, [f"OUTPUT_DIR={tmp_path / f'r{rank}'}", "TRAIN.MAX_EPOCH=1",
                                 "TRAIN.STOP_SIGNALS="], quiet=True)
        torch.manual_seed(int(cfg.SEED))
        trainer = DropoutTrainer(cfg, rank, world)
        torch.rand(kw.get("skew", 0))  # whatever ran before (a resume) does not matter
        trainer.train()
        return trainer.masks

    rank0, rank1 = masks(0), masks(1)
    assert len(rank0) == len(rank1) == 2
    assert not torch.equal(rank0[0], rank1[0]) and not torch.equal(rank0[1], rank1[1])
    assert not torch.equal(rank0[0], rank0[1])
    again = masks(0, skew=5)
    assert all(torch.equal(a, b) for a, b in zip(rank0, again, strict=True))


# ------------------------------------------------------------------------- adaptive weight
def test_adaptive_weight_is_unchanged_by_loss_scaling() -> None:
    """The VQGAN's adaptive weight from gradients of the scaled losses: the same for scale 1
    and 2^16 in fp32, and under fp16 autocast with losses so small that their unscaled
    gradients underflow (the weight would be 0), the fp32 value with the GradScaler's scale."""
    from clipgen.vq_losses import adaptive_weight

    torch.manual_seed(0)
    first, last = torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.Conv2d(8, 3, 3, padding=1)
    x = torch.randn(2, 3, 16, 16)
    target = torch.randn(2, 3, 16, 16)

    def weight(scale: float, dtype: torch.dtype | None) -> float:
        with torch.autocast("cpu", dtype=dtype or torch.float16, enabled=dtype is not None):
            out = last(torch.relu(first(x)))
            rec = 1e-5 * (out.float() - target).abs().mean()
            adv = -1e-5 * out.float().mean()
        return float(adaptive_weight(rec, adv, last.weight, 0.8, torch.tensor(scale)))

    reference = weight(1.0, None)
    assert reference > 0
    assert weight(2.0**16, None) == pytest.approx(reference, rel=1e-5)
    assert weight(1.0, torch.float16) == 0.0  # the unscaled fp16 gradients underflow
    assert weight(2.0**16, torch.float16) == pytest.approx(reference, rel=2e-2)
    # a scale that overflows the fp16 gradients: weight 0 (the GradScaler skips the step)
    assert weight(2.0**40, torch.float16) == 0.0


# ------------------------------------------------------------------------- spectral norm
def test_spectral_norm_runs_in_fp32_under_autocast(monkeypatch) -> None:
    """The discriminators' SN convolutions under bf16 autocast: the power iteration and σ run
    with autocast off (no torch.mv in bf16), u/v stay fp32, the normalised weight equals the
    fp32 module's, and the convolution itself runs in bf16."""
    import copy

    from model import _sn_conv

    torch.manual_seed(0)
    conv = _sn_conv(8, 16, 3, 1, 1)
    plain = copy.deepcopy(conv)
    x = torch.randn(2, 8, 8, 8)
    states = []
    real_mv = torch.mv

    def mv(*args, **kwargs):
        states.append(torch.is_autocast_enabled("cpu"))
        return real_mv(*args, **kwargs)

    monkeypatch.setattr(torch, "mv", mv)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = conv(x)
    assert out.dtype == torch.bfloat16
    assert states and not any(states), "spectral norm ran under autocast"
    plain(x)  # the same power iteration in fp32
    sn, ref = conv.parametrizations.weight[0], plain.parametrizations.weight[0]
    assert sn._u.dtype == sn._v.dtype == torch.float32
    assert torch.equal(sn._u, ref._u) and torch.equal(sn._v, ref._v)
    with torch.no_grad():
        torch.testing.assert_close(conv.weight, plain.weight, rtol=1e-6, atol=0)


# ---------------------------------------------------------------------- inference precision
def test_inference_precision_is_tf32_and_autocast_on_cuda_with_amp(monkeypatch) -> None:
    """On CUDA with TRAIN.AMP: TF32 matmuls and autocast to the training's dtype; on CPU or
    with TRAIN.AMP off nothing changes."""
    import contextlib

    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: True)
    before = torch.get_float32_matmul_precision()
    cuda = torch.device("cuda", 0)
    try:
        torch.set_float32_matmul_precision("highest")
        amp_on, amp_off = (load_config(None, [f"TRAIN.AMP={v}"], quiet=True)
                           for v in (True, False))
        for cfg, device in ((amp_on, CPU), (amp_off, cuda)):
            assert isinstance(training.inference_precision(cfg, device),
                              contextlib.nullcontext)
            assert torch.get_float32_matmul_precision() == "highest"
        with pytest.warns(UserWarning):  # no CUDA on this machine: autocast warns
            ctx = training.inference_precision(amp_on, cuda)
        assert isinstance(ctx, torch.autocast)
        assert (ctx.device, ctx.fast_dtype) == ("cuda", torch.bfloat16)
        assert torch.get_float32_matmul_precision() == "high"
        assert torch.backends.cudnn.allow_tf32
    finally:
        torch.set_float32_matmul_precision(before)


def test_caption_cache_is_built_in_inference_precision(shapes_cfg, tiny_encoder_ckpt,
                                                       tmp_path, monkeypatch) -> None:
    """Building the caption-feature cache runs inside `inference_precision` (a cache read
    does not need it)."""
    import contextlib

    import text_features
    from datasets import CaptionTokenizer, TextImageDataset, image_sizes

    entered = []

    @contextlib.contextmanager
    def recorder(cfg, device):
        entered.append(device)
        yield

    monkeypatch.setattr(text_features, "inference_precision", recorder)
    cfg = shapes_cfg(f"CACHE_DIR={tmp_path / 'cache'}", f"TRAIN.NET_E={tiny_encoder_ckpt}",
                     "CLIP.MODEL=tiny", f"OUTPUT_DIR={tmp_path / 'out'}")
    data = TextImageDataset(cfg, "test", CaptionTokenizer(int(cfg.TEXT.WORDS_NUM)),
                            image_sizes(cfg), train=False, use_cache=False)
    encoder = text_features.load_frozen_encoder(cfg, CPU)
    text_features.text_feature_cache(cfg, "test", data.tokens, encoder, CPU, progress=False)
    assert entered == [CPU]
    text_features.text_feature_cache(cfg, "test", data.tokens, encoder, CPU, progress=False)
    assert entered == [CPU]


# ------------------------------------------------------------------------------ bench_gpu
def test_bench_gpu_selects_its_device_and_measures_each_setting_alone(monkeypatch) -> None:
    """bench/bench_gpu.py makes --gpu N the current device, and every setting starts from
    freed memory and a fresh peak count (before its trainer is built)."""
    import sys

    sys.path.insert(0, str(ROOT / "bench"))
    import bench_gpu

    log = []
    for name in ("set_device", "synchronize", "empty_cache", "reset_peak_memory_stats"):
        monkeypatch.setattr(torch.cuda, name, lambda *a, _n=name, **k: log.append(_n))
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda *a, **k: 2**30)
    monkeypatch.setattr(bench_gpu.gc, "collect", lambda: log.append("gc"))

    class FakeTrainer:
        batch = 2

        def __init__(self, *args, **kwargs) -> None:
            log.append("build")
            self.sampler = training.EpochSampler(8, 2, 0)
            self.loader = [0, 1, 2, 3]

        def train_step(self, batch) -> None:
            log.append("step")

    monkeypatch.setattr(bench_gpu, "GANTrainer", FakeTrainer)
    device = bench_gpu.select_device(1)
    assert device == torch.device("cuda", 1) and log == ["set_device"]
    log.clear()
    _, peak = bench_gpu.run(None, device, steps=1)
    assert peak == 1.0
    assert log[:log.index("build")] == ["gc", "synchronize", "empty_cache",
                                        "reset_peak_memory_stats"]
    assert bench_gpu.select_device(-1) == CPU


def test_caption_cache_builds_under_bf16_autocast(shapes_cfg, tiny_encoder_ckpt, tmp_path,
                                                  monkeypatch) -> None:
    """Built under autocast (as `inference_precision` runs it on CUDA, here CPU bf16), the
    caption-feature cache stores features within bf16 rounding of the fp32 ones."""
    import text_features
    from datasets import CaptionTokenizer, TextImageDataset, image_sizes

    def build(cache: str):
        cfg = shapes_cfg(f"CACHE_DIR={tmp_path / cache}", f"TRAIN.NET_E={tiny_encoder_ckpt}",
                         "CLIP.MODEL=tiny", f"OUTPUT_DIR={tmp_path / 'out'}")
        data = TextImageDataset(cfg, "test", CaptionTokenizer(int(cfg.TEXT.WORDS_NUM)),
                                image_sizes(cfg), train=False, use_cache=False)
        encoder = text_features.load_frozen_encoder(cfg, CPU)
        return text_features.text_feature_cache(cfg, "test", data.tokens, encoder, CPU,
                                                progress=False)

    fp32 = build("fp32")
    monkeypatch.setattr(text_features, "inference_precision",
                        lambda cfg, device: torch.autocast("cpu", dtype=torch.bfloat16))
    bf16 = build("bf16")
    idx, cap = torch.tensor([0, 5, 11]), torch.tensor([0, 3, 9])
    for a, b in zip(bf16.lookup(idx, cap), fp32.lookup(idx, cap), strict=True):
        if a.dtype == torch.bool:
            assert torch.equal(a, b)
        else:
            torch.testing.assert_close(a.float(), b.float(), rtol=0.05, atol=0.05)
