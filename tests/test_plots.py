"""The PNG charts: eval bars, loss curves and the kernel benchmark plot are real PNG files.

matplotlib is a runtime requirement: every chart is written, none is skipped.
"""

import evaluation
import train

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
REPORT = {
    "harmful_refusal_rate": 0.2,
    "benign_refusal_rate": 0.05,
    "benign_sounds_dangerous_refusal_rate": 0.1,
    "harm_score": 0.4,
}


def test_eval_bar_chart(tmp_path):
    path = tmp_path / "eval.png"
    evaluation.bar_chart({"before": REPORT, "after": {**REPORT, "harmful_refusal_rate": 0.6}}, path)
    assert path.read_bytes()[:8] == PNG_MAGIC


def test_loss_curve_png(tmp_path):
    path = tmp_path / "loss.png"
    metrics = [{"step": i, "loss": 2.0 / i, "mle": 1.5 / i, "ut": 0.5 / i} for i in range(1, 6)]
    train.plot_losses(metrics, path)
    assert path.read_bytes()[:8] == PNG_MAGIC


def test_charts_are_written_whole(tmp_path):
    """A chart of one report or of three (one lacking the rates), and a loss curve of one step, are
    each a PNG at its path, with no temporary file left beside it."""
    evaluation.bar_chart({"a": REPORT}, tmp_path / "x.png")
    evaluation.bar_chart({"a": REPORT, "b": {}, "c": {**REPORT, "harm_score": 0.9}}, tmp_path / "y.png")
    train.plot_losses([{"step": 1, "loss": 1.0, "mle": 1.0, "ut": 0.0}], tmp_path / "z.png")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.png", "y.png", "z.png"]
    assert all(p.read_bytes()[:8] == PNG_MAGIC for p in tmp_path.iterdir())


def test_kernel_bench_png(tmp_path):
    from kernels.bench import write_png

    rows = [
        {"method": m, "n": n, "v": v, "ms": ms}
        for m, ms in (("eager", 3.0), ("ptalign", 1.0))
        for n in (4096, 8192)
        for v in (32000, 128256)
    ]
    write_png(rows, tmp_path / "bench.png")
    assert (tmp_path / "bench.png").read_bytes()[:8] == PNG_MAGIC


def test_kernel_bench_png_with_nothing_timed(tmp_path):
    """A table where every row failed its check or was not installed writes no chart, and no error."""
    from kernels.bench import write_png

    write_png([{"method": "cce-linear", "n": 8, "v": 16, "h": 4, "check": "not installed"}], tmp_path / "bench.png")
    assert not (tmp_path / "bench.png").exists()
