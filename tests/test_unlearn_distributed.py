"""Multi-process unlearning: two processes launched by Accelerate (gloo, CPU) give the loss curve of one process
with the same global batch."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import patchlab
from patchlab.tiny import tiny_model, word_tokenizer
from patchlab.unlearning import unlearn
from conftest import ROOT
from test_unlearn import FORGET, RETAIN, TEXTS

SCRIPT = ROOT / "analyses" / "unlearn.py"

pytestmark = pytest.mark.usefixtures("one_thread")

#: npo_kl covers both reductions (per-sequence NPO term, precomputed; per-token KL term with a held reference).
#: Batches of 3 over 5 forget and 4 retain examples of different lengths give uneven shares (3 = 2 + 1 sequences,
#: unequal token counts; a last batch of 1 is repeated on both processes); grad_accum 2 makes the first
#: micro-batch of each step skip the gradient synchronisation.
ARGS = {"method": "npo_kl", "lr": 3e-3, "epochs": 3, "batch_size": 3, "grad_accum": 2, "beta": 0.5}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_give_the_one_process_loss_curve(tmp_path):
    """``accelerate launch --cpu --num_processes 2`` starts a single process in Accelerate 1.x (its simple
    launcher spawns several only through mpirun), so the test launches with ``--multi_gpu`` and the GPUs hidden:
    torch.distributed.run starts two processes and Accelerate runs them on the CPU with gloo."""
    tok = word_tokenizer([f"{r['question']} {r['answer']}" for r in FORGET + RETAIN] + TEXTS)
    model = tiny_model("llama", len(tok), n_layers=2, d_model=32, d_mlp=64, n_heads=4, n_kv_heads=2, seed=0)
    model.save_pretrained(tmp_path / "model")
    tok.save_pretrained(tmp_path / "model")
    (tmp_path / "forget.json").write_text(json.dumps(FORGET + TEXTS))
    (tmp_path / "retain.json").write_text(json.dumps(RETAIN + TEXTS[1:]))
    flags = [x for k, v in ARGS.items() for x in (f"--{k.replace('_', '-')}", str(v))]
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           "--main_process_port", str(free_port()), str(SCRIPT), "--model", str(tmp_path / "model"),
           "--forget", str(tmp_path / "forget.json"), "--retain", str(tmp_path / "retain.json"), *flags,
           "--out", str(tmp_path / "two"), "--quiet"]
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(Path(patchlab.__file__).parents[1]), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("wrote ") == 1  # only the main process writes and reports

    one = unlearn(tmp_path / "model", tmp_path / "forget.json", tmp_path / "retain.json", progress=False, **ARGS)
    two = json.loads((tmp_path / "two" / "unlearn_run.json").read_text())
    assert two["settings"]["n_processes"] == 2 and one.settings["n_processes"] == 1
    assert len(two["losses"]) == len(one.losses) == 3
    torch.testing.assert_close(two["losses"], one.losses, rtol=1e-5, atol=1e-6)
    trained = dict(patchlab.load_model(tmp_path / "two").named_parameters())
    for name, p in one.model.named_parameters():
        torch.testing.assert_close(trained[name], p, rtol=1e-4, atol=1e-6)
