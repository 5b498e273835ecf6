"""Tests of the `rabit` command line and of the quickstart job (at a tiny size)."""

import json
import subprocess
import sys

import pytest
import torch

import rabit.quickstart as Q
from rabit.cli import main

TINY = Q.QuickstartPlan(train_seqs=12, eval_seqs=4, seq_len=32, gen_batch=12, calib_seqs=4, batch_size=4,
                        bench_new_tokens=4)


def test_top_level_help(capsys):
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    assert "usage: rabit" in out and "quickstart" in out
    from rabit.cli import COMMANDS

    for name in COMMANDS:
        assert name in out


def test_quickstart_help(capsys):
    assert main(["quickstart", "--help"]) == 0
    out = capsys.readouterr().out
    for flag in ("--steps", "--out", "--seed", "--json", "--device"):
        assert flag in out


@pytest.mark.parametrize("argv, needle", [
    ([], "COMMAND"),
    (["frobnicate"], "invalid choice"),
    (["quickstart", "--steps", "0"], "--steps"),
    (["quickstart", "--steps", "many"], "--steps"),
    (["quickstart", "--seed", "-1"], "--seed"),
    (["quickstart", "--device", "tpu"], "--device"),
    (["quickstart", "--bogus"], "unrecognized arguments"),
])
def test_bad_arguments_exit_2_with_a_message(capsys, argv, needle):
    assert main(argv) == 2
    assert needle in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU error path")
def test_cuda_without_a_gpu_is_a_clear_error(capsys):
    assert main(["quickstart", "--device", "cuda", "--quiet"]) == 1
    err = capsys.readouterr().err
    assert "cuda" in err and "--device cpu" in err


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU error path")
@pytest.mark.parametrize("argv", [["train", "--model", "stories260k", "--out", "OUT", "--device", "cuda"],
                                  ["eval", "OUT", "--ppl", "--device", "cuda"]])
def test_every_command_says_cuda_is_missing_before_any_work(tmp_path, capsys, argv):
    argv = [str(tmp_path / "o") if a == "OUT" else a for a in argv]
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert "torch sees no CUDA GPU" in err and "--device cpu" in err
    assert not (tmp_path / "o").exists()  # nothing was started


@pytest.mark.parametrize("device", ["bogus", "cuda:x"])
def test_an_unknown_device_is_named(tmp_path, capsys, device):
    assert main(["train", "--model", "stories260k", "--out", str(tmp_path / "o"), "--device", device]) == 1
    err = capsys.readouterr().err
    assert f"--device {device!r} is not a torch device" in err


@pytest.mark.parametrize("tokens", ["inf", "nan", "-5", "lots"])
def test_train_rejects_a_token_count_that_is_not_a_finite_number(capsys, tokens):
    assert main(["train", "--model", "stories260k", "--out", "x", "--tokens", tokens]) == 2
    assert "--tokens" in capsys.readouterr().err


def test_train_says_the_block_stage_needs_more_sequences_before_sampling(tmp_path, capsys):
    assert main(["train", "--model", "stories260k", "--out", str(tmp_path / "o"), "--device", "cpu",
                 "--data-seqs", "8", "--tokens", "2048"]) == 1
    err = capsys.readouterr().err
    assert "data_seqs is 8" in err and "--block-steps 0" in err
    assert not (tmp_path / "o").exists()  # rejected with the config, before the teacher data are sampled


def test_train_says_wikitext_is_missing_before_sampling(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("RABIT_SHARED", str(tmp_path / "no_shared"))
    monkeypatch.delenv("RABIT_WIKITEXT", raising=False)
    assert main(["train", "--model", "stories260k", "--out", str(tmp_path / "o"), "--device", "cpu",
                 "--data-seqs", "8", "--block-steps", "0", "--tokens", "2048"]) == 1
    assert "WikiText-2" in capsys.readouterr().err
    assert not (tmp_path / "o" / "teacher_data.safetensors").exists()


@pytest.mark.parametrize("argv", [["quickstart", "--out", "FILE"], ["quickstart", "--out", "FILE/sub"],
                                  ["train", "--model", "stories260k", "--out", "FILE", "--block-steps", "0"],
                                  ["bench", "--out", "FILE", "--reps", "1"]])
def test_an_output_that_is_a_file_is_named_before_any_work(tmp_path, capsys, monkeypatch, argv):
    def no_work(*a, **k):
        raise AssertionError("work started before the output was checked")

    monkeypatch.setattr("rabit.models.load_stories260k", no_work)
    monkeypatch.setattr("rabit.models.load_model", no_work)
    monkeypatch.setattr("rabit.bench.bench_shape", no_work)
    f = tmp_path / "a_file"
    f.write_text("keep me")
    assert main([str(f) + a[4:] if a.startswith("FILE") else a for a in argv] + ["--device", "cpu"] * (
        argv[0] != "bench")) == 1
    assert "is a file or lies under one; pass a directory" in capsys.readouterr().err
    assert f.read_text() == "keep me"


@pytest.mark.parametrize("content", ["[1, 2]", '"llama"'])
def test_generate_on_a_config_that_is_not_an_object_names_it(tmp_path, capsys, content):
    (tmp_path / "config.json").write_text(content)
    assert main(["generate", str(tmp_path), "--prompt", "hi"]) == 1
    assert "must hold a JSON object" in capsys.readouterr().err


def test_python_dash_m_rabit_help():
    r = subprocess.run([sys.executable, "-m", "rabit", "quickstart", "--help"], capture_output=True, text=True,
                       check=False, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "--steps" in r.stdout


def test_quickstart_end_to_end_tiny(tmp_path, monkeypatch, capsys):
    """The whole job at a toy size through the CLI: JSON on stdout, result.json, resumable out dir."""
    real = Q.run_quickstart
    monkeypatch.setattr(Q, "run_quickstart", lambda **kw: real(plan=TINY, **kw))
    assert main(["quickstart", "--steps", "3", "--out", str(tmp_path), "--json", "--quiet"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res == json.loads((tmp_path / "result.json").read_text())
    assert res["train"]["steps"] == 3 and res["eval"]["sequences"] == 4
    assert 1.0 <= res["fp"]["ppl"] and 1.0 <= res["rabit_2bit"]["ppl"]
    assert res["rabit_2bit"]["kl_to_fp"] > 0 and 0 <= res["rabit_2bit"]["top1_agreement"] <= 1
    # 2 sign bits + fp16 scales instead of fp32 weights
    assert res["rabit_2bit"]["linear_bytes"] * 6 < res["fp"]["linear_bytes"]
    assert res["fp"]["tokens_per_s"] > 0 and res["rabit_2bit"]["tokens_per_s"] > 0
    for name in ("teacher_train.safetensors", "teacher_eval.safetensors", "train/checkpoint.safetensors",
                 "train/history.json"):
        assert (tmp_path / name).is_file(), name

    # run again on the same folder: data come from the cache and training is already complete
    assert main(["quickstart", "--steps", "3", "--out", str(tmp_path), "--json", "--quiet"]) == 0
    again = json.loads(capsys.readouterr().out)
    assert again["train"]["resumed_from"] == 3
    assert again["rabit_2bit"]["kl_to_fp"] == pytest.approx(res["rabit_2bit"]["kl_to_fp"], rel=1e-6)


def test_quickstart_report_is_printed(monkeypatch, capsys):
    res = Q.run_quickstart(steps=2, progress=False, report=True, plan=TINY)
    out = capsys.readouterr().out
    assert "RaBiT 2-bit" in out and "top-1 agreement" in out and "tokens/s" in out
    assert f"{res['fp']['ppl']:.3f}" in out
    # the plan's embedding switch reaches the trainer (trained by default in the quickstart, frozen in rabit train)
    assert TINY.train_embeddings and res["train"]["config"]["freeze_embeddings"] is False


@pytest.mark.parametrize("argv", [["--threads", "0"], ["--reps", "0"], ["--m", "0"], ["--m", "-1"]])
def test_bench_rejects_counts_below_one(capsys, argv):
    assert main(["bench", *argv]) == 2
    assert argv[0] in capsys.readouterr().err


def test_bench_and_train_have_help(capsys):
    from rabit.cli import main

    assert main(["bench", "--help"]) == 0
    assert main(["train", "--help"]) == 0
    assert main(["train", "--method", "nonsense", "--out", "x"]) == 2


def test_train_passes_its_options_to_the_experiment(monkeypatch, tmp_path, capsys):
    import rabit.experiment as X
    from rabit.cli import main

    seen = {}

    def fake_run(cfg, out, device, progress):
        seen.update(cfg=cfg, out=out, device=device)
        return {"method": cfg.method, "model": cfg.model, "wikitext2_ppl": {"2048": {"ppl": 1.0}},
                "train_tokens": cfg.steps * cfg.batch_size * cfg.seq_len}

    monkeypatch.setattr(X, "run_experiment", fake_run)
    assert main(["train", "--model", "stories260k", "--method", "independent", "--tokens", "2e4", "--curve", "5",
                 "--data-seqs", "64", "--device", "cpu", "--out", str(tmp_path), "--quiet"]) == 0
    cfg = seen["cfg"]
    assert (cfg.method, cfg.tokens, cfg.curve_points, cfg.data_seqs) == ("independent", 20000, 5, 64)
    assert cfg.compile == "auto"  # compiled on CUDA, eager on the CPU (resolved by the trainer)
    assert main(["train", "--model", "stories260k", "--no-compile", "--device", "cpu", "--out", str(tmp_path),
                 "--quiet"]) == 0
    assert seen["cfg"].compile is False
    assert seen["device"] == "cpu" and "ctx 2048: 1.00" in capsys.readouterr().out
    # every recipe option reaches the config
    assert main(["train", "--model", "stories260k", "--seq-len", "64", "--batch-size", "8", "--data-temperature",
                 "0.7", "--data-top-k", "40", "--lr-latent", "2e-4", "--lr-scales", "5e-3", "--min-lr-ratio", "0.25",
                 "--muon-momentum", "0.9", "--weight-decay", "0.05", "--kl-temperature", "2", "--train-embeddings",
                 "--gamma", "0.5", "--seed", "3", "--data-start", "random-token", "--data-greedy", "4",
                 "--data-dtype", "bfloat16", "--gen-batch", "64", "--init-iters", "2", "--alpha-in", "0.25",
                 "--alpha-out", "1", "--latent-init", "reconstruction", "--ste", "clipped", "--compile",
                 "--block-steps", "7", "--block-inputs", "student", "--block-seqs", "96",
                 "--device", "cpu", "--out", str(tmp_path), "--quiet"]) == 0
    cfg = seen["cfg"]
    assert (cfg.block_steps, cfg.block_inputs, cfg.block_seqs, cfg.block_rows) == (7, "student", 96, 96)
    assert (cfg.init_iters, cfg.alpha_in, cfg.alpha_out, cfg.latent_init, cfg.ste, cfg.compile) == (
        2, 0.25, 1.0, "reconstruction", "clipped", True)
    rc = cfg.rabit_config()
    assert (rc.init_iters, rc.alpha_in, rc.alpha_out, rc.latent_init, rc.ste) == (2, 0.25, 1.0, "reconstruction",
                                                                                   "clipped")
    assert (cfg.seq_len, cfg.batch_size, cfg.data_temperature, cfg.data_top_k, cfg.lr_latent, cfg.lr_scales,
            cfg.min_lr_ratio, cfg.gamma, cfg.seed) == (64, 8, 0.7, 40, 2e-4, 5e-3, 0.25, 0.5, 3)
    assert cfg.gen_batch == 64
    tc = cfg.train_config()  # what the trainer gets
    assert (tc.lr_latent, tc.lr_scales, tc.min_lr_ratio, tc.muon_momentum, tc.weight_decay, tc.gamma, tc.seed) == (
        2e-4, 5e-3, 0.25, 0.9, 0.05, 0.5, 3)
    assert (tc.kl_temperature, tc.freeze_embeddings) == (2.0, False)
    from rabit.experiment import ExperimentConfig

    assert ExperimentConfig().train_config().freeze_embeddings  # frozen unless asked
    assert cfg.sampling_kwargs() == dict(temperature=0.7, top_k=40, start="random-token", greedy_tokens=4, seed=3,
                                         dtype="bfloat16")
    text = tmp_path / "mine.txt"
    assert main(["train", "--model", "stories260k", "--text", str(text), "--device", "cpu", "--out", str(tmp_path),
                 "--quiet"]) == 0
    assert seen["cfg"].text == str(text)
    # the sampling options and a text file exclude each other (an error, not an ignored option)
    assert main(["train", "--text", str(text), "--data-temperature", "0.7", "--out", str(tmp_path), "--quiet"]) == 1
    assert "do not apply to training on a text file" in capsys.readouterr().err
    assert main(["train", "--curve", "-1", "--out", str(tmp_path)]) == 2
    assert main(["train", "--data-top-k", "0", "--out", str(tmp_path)]) == 2
    assert main(["train", "--data-dtype", "float64", "--out", str(tmp_path)]) == 2
    assert main(["train", "--gen-batch", "0", "--out", str(tmp_path)]) == 2
    assert main(["train", "--data-start", "prompt", "--out", str(tmp_path)]) == 2
    assert main(["train", "--latent-init", "zeros", "--out", str(tmp_path)]) == 2
    assert main(["train", "--ste", "sigmoid", "--out", str(tmp_path)]) == 2
    assert main(["train", "--init-iters", "-1", "--out", str(tmp_path)]) == 2
    # the plain init takes no init options: an error, not options silently dropped
    assert main(["train", "--method", "rabit-plain", "--alpha-in", "0.3", "--out", str(tmp_path), "--quiet"]) == 1
    assert "do not apply to it" in capsys.readouterr().err


def test_train_out_of_gpu_memory_names_the_fix(monkeypatch, tmp_path, capsys):
    """A CUDA out-of-memory error in `rabit train` becomes a one-line error that names the batch size to lower."""
    import torch

    import rabit.experiment as X
    from rabit.cli import main

    def oom(cfg, out, device, progress):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 3.00 GiB\nmore details")

    monkeypatch.setattr(X, "run_experiment", oom)
    assert main(["train", "--model", "stories260k", "--batch-size", "24", "--out", str(tmp_path), "--quiet"]) == 1
    err = capsys.readouterr().err
    assert "out of GPU memory at batch 24 x 512" in err and "--batch-size" in err
    assert "Tried to allocate 3.00 GiB" in err and "more details" not in err
    assert "drop --no-compile" not in err  # compiled already: the batch size is what is left to lower
    assert main(["train", "--model", "stories260k", "--no-compile", "--out", str(tmp_path), "--quiet"]) == 1
    assert "drop --no-compile" in capsys.readouterr().err


def test_experiment_config_rejects_a_bad_recipe():
    from rabit.experiment import ExperimentConfig

    with pytest.raises(ValueError, match="data_temperature"):
        ExperimentConfig(data_temperature=0.0)
    with pytest.raises(ValueError, match="data_top_k"):
        ExperimentConfig(data_top_k=0)
    with pytest.raises(ValueError, match="min_lr_ratio"):
        ExperimentConfig(min_lr_ratio=-1.0)
    with pytest.raises(ValueError, match="data_start"):
        ExperimentConfig(data_start="prompt")
    with pytest.raises(ValueError, match="data_greedy"):
        ExperimentConfig(data_greedy=3)  # greedy tokens after BOS: every sequence would begin alike
    with pytest.raises(ValueError, match="data_dtype"):
        ExperimentConfig(data_dtype="float64")
    with pytest.raises(ValueError, match="latent_init"):
        ExperimentConfig(latent_init="zeros")
    with pytest.raises(ValueError, match="ste"):
        ExperimentConfig(ste="sigmoid")
    with pytest.raises(ValueError, match="init_iters"):
        ExperimentConfig(init_iters=-1)
    with pytest.raises(ValueError, match="init_iters, alpha_out do not apply"):
        ExperimentConfig(method="rabit-plain", init_iters=3, alpha_out=1.0)
    with pytest.raises(ValueError, match="gen_batch"):
        ExperimentConfig(gen_batch=0)
    with pytest.raises(ValueError, match="block_steps"):
        ExperimentConfig(block_steps=-1)
    with pytest.raises(ValueError, match="block_inputs"):
        ExperimentConfig(block_inputs="fp")
    with pytest.raises(ValueError, match="block_seqs must be"):
        ExperimentConfig(block_seqs=0)
    with pytest.raises(ValueError, match="block_seqs 9000 is more than the 8192 training sequences"):
        ExperimentConfig(block_seqs=9000)
    assert ExperimentConfig().block_rows == ExperimentConfig().calib_seqs
    for method in ("ptq", "path-freeze"):
        with pytest.raises(ValueError, match=f"{method} does not"):
            ExperimentConfig(method=method, block_steps=10)
    # the trainer's options fail here, before any model is loaded or data sampled, named for the command
    for bad, match in ((dict(muon_momentum=1.0), "muon_momentum"), (dict(weight_decay=-0.1), "weight_decay"),
                       (dict(weight_decay=float("nan")), "weight_decay"), (dict(lr_latent=float("inf")), "lr_latent"),
                       (dict(compile="yes"), "compile"), (dict(kl_temperature=0.0), "kl_temperature"),
                       (dict(batch_size=0), "batch_size"), (dict(seq_len=0), "seq_len")):
        with pytest.raises(ValueError, match=f"^rabit train: {match}"):
            ExperimentConfig(**bad)
    for sampling in (dict(data_temperature=0.7), dict(data_top_k=5), dict(data_start="random-token"),
                     dict(data_dtype="bfloat16")):
        with pytest.raises(ValueError, match="do not apply to training on a text file"):
            ExperimentConfig(text="mine.txt", **sampling)
