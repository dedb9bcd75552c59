"""What the user sees: logging through TORCH_LOGS, the grouped summary, clean locations, windows in
NATTEN's terms, HTML for notebooks, ``rewrite --version``."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch

import rewrite

pytestmark = pytest.mark.usefixtures("fresh_dynamo_no_grad")


def _masked(keep):
    def fn(q, k, v):
        s = torch.einsum("bhnd,bhmd->bhnm", q, k) / 4.0
        return torch.einsum("bhnm,bhmd->bhnd", s.masked_fill(~keep(q.shape[-2]), float("-inf")).softmax(-1), v)
    return fn


def _grid_7x7(n):  # 2-D neighborhood on a 16×16 grid: |dy| ≤ 3 and |dx| ≤ 3, i.e. a 7×7 window
    i = torch.arange(n)
    y, x = i // 16, i % 16
    return ((y[:, None] - y[None, :]).abs() <= 3) & ((x[:, None] - x[None, :]).abs() <= 3)


def _sliding_32(n):  # Mistral's sliding_window=32: key m kept when 0 <= p − m < 32
    i = torch.arange(n)
    dist = i[:, None] - i[None, :]
    return (dist >= 0) & (dist < 32)


def _qkv(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(1, 2, n, 16, generator=g) for _ in range(3)]


def test_2d_window_reads_as_natten_kernel_size():
    report = rewrite.inspect(_masked(_grid_7x7), *_qkv(256))
    (site,) = report.sites
    assert site.rewritten and site.variant == "neighborhood", str(report)
    assert site.window["kernel_size"] == (7, 7) and site.window["dilation"] == (1, 1), site.window
    assert site.window["causal"] == (False, False) and site.window["grid"] == (16, 16), site.window
    assert "7×7 window" in site.mask_text and "16×16 grid" in site.mask_text, site.mask_text
    assert "7×7 window" in str(report) and "window=(3, 3)" not in str(report)
    assert report.to_dict()["sites"][0]["window"]["kernel_size"] == (7, 7)


def test_mistral_sliding_window_reads_as_its_config_value():
    report = rewrite.inspect(_masked(_sliding_32), *_qkv(80))
    (site,) = report.sites
    assert site.rewritten and site.variant == "neighborhood", str(report)
    assert site.mask_spec.window == (31,)  # the IR's half-width: keys [p − 31, p]
    assert site.window["kernel_size"] == (32,) and site.window["causal"] == (True,), site.window
    assert "causal window 32 (keys m in (p − 32, p])" in str(report), str(report)


def _llama(layers):
    transformers = pytest.importorskip("transformers")
    cfg = transformers.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
                                   num_attention_heads=4, num_key_value_heads=2, vocab_size=128,
                                   max_position_embeddings=64, attn_implementation="eager")
    torch.manual_seed(0)
    return transformers.LlamaModel(cfg).eval()


def test_many_sites_print_one_line_per_group_and_clean_locations():
    ids = torch.randint(0, 128, (2, 17), generator=torch.Generator().manual_seed(0))
    report = rewrite.inspect(_llama(4), input_ids=ids)
    assert len(report.sites) == 4 and all(s.rewritten for s in report.sites), report.details()
    for i, s in enumerate(report.sites):
        assert s.location.startswith(f"layers.{i}.self_attn (modeling_llama.py:"), s.location
        assert "L['" not in s.location and "site-packages" not in s.location, s.location
    text = str(report)
    assert "  4 causal sites, all on sdpa" in text.splitlines(), text
    assert "cascade:" not in text and "report.details()" in text  # details only when asked
    assert text.count("\n") < 20, text
    assert report.details().count("cascade:") == 4
    html = report._repr_html_()
    assert html.startswith("<pre") and "4 causal sites, all on sdpa" in html


def test_left_alone_sites_are_grouped_with_their_reason():
    def with_dropout(q, k, v):  # training-mode dropout is left alone, with the reason
        a = torch.nn.functional.dropout((q @ k.transpose(-1, -2)).softmax(-1), 0.1, training=True)
        return a @ v

    report = rewrite.inspect(with_dropout, *_qkv(8))
    alone = [s for s in report.sites if not s.rewritten]
    assert alone, str(report)
    assert any(line.strip().endswith(f"left alone: {alone[0].reason}") for line in str(report).splitlines())


def _run(tmp_path, code, **env):
    script = tmp_path / "logged.py"
    script.write_text(textwrap.dedent(code))
    return subprocess.run([sys.executable, str(script)], capture_output=True, text=True, cwd=tmp_path,
                          env={**os.environ, **env}, timeout=120)


LOGGED = """
import torch, rewrite
def attn(q, k, v):
    return (q @ k.transpose(-1, -2)).softmax(-1) @ v
q = torch.randn(1, 2, 8, 4)
rewrite.compile(attn)(q, q, q)
"""


def test_torch_logs_shows_rewrite_decisions(tmp_path):
    out = _run(tmp_path, LOGGED, TORCH_LOGS="+rewrite")
    assert out.returncode == 0, out.stderr
    assert "site at logged.py:4, attn: dense" in out.stderr and "kernel sdpa" in out.stderr, out.stderr
    assert "fx nodes, lowered for sizes" in out.stderr, out.stderr  # DEBUG records too
    quiet = _run(tmp_path, LOGGED, TORCH_LOGS="", REWRITE_LOG="")
    assert "site at" not in quiet.stderr, quiet.stderr


def test_set_logs_and_rewrite_log_show_decisions(tmp_path):
    set_logs = "import logging, torch, rewrite\ntorch._logging.set_logs(modules={'rewrite': logging.INFO})\n"
    out = _run(tmp_path, set_logs + LOGGED)
    assert out.returncode == 0 and "kernel sdpa" in out.stderr, out.stderr
    out = _run(tmp_path, LOGGED, REWRITE_LOG="info")
    assert out.returncode == 0 and "[rewrite] INFO site at" in out.stderr, out.stderr


def test_version_on_the_command_line():
    script = os.path.join(os.path.dirname(sys.executable), "rewrite")  # the console script of the install
    commands = [[sys.executable, "-m", "rewrite", "--version"]] + ([[script, "--version"]] * os.path.exists(script))
    for cmd in commands:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
        assert out.returncode == 0 and out.stdout.startswith(f"rewrite {rewrite.__version__} (torch "), out


def test_explain_names_the_graph_break_inside_attention():
    def split(q, k, v):
        s = q @ k.transpose(-1, -2) * 0.5
        torch._dynamo.graph_break()  # the attention is split across two graphs
        return s.softmax(-1) @ v

    report = rewrite.explain(split, *_qkv(8))
    text = str(report)
    assert report.sites == [] and report.graphs == 2, text
    assert "1 graph break reason(s)" in text.splitlines()[0], text
    assert "not seen whole): Call to `torch._dynamo.graph_break()`" in text
    assert len(report.break_points) == 1 and report.break_points[0].startswith("split, line "), text
    assert "Dynamo resumed after a break in split, line" in text and "┏" not in text, text  # no empty table
