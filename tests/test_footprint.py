"""What a default agent loads: heavy packages that only an option needs stay out of its process."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# river (and through it scikit-learn, pandas and scipy: about 120 MB and 0.9 s) serves only the
# page_hinkley and adwin detectors; onnxruntime serves only runtime = "onnx"; torch._dynamo (and
# sympy with it: about 70 MB and 0.9 s) serves only torch.compile, which the agent never uses, but
# every torch.optim optimizer imports it (agent.optim.Adam does not).
OPTIONAL = {"river", "sklearn", "pandas", "scipy", "onnxruntime", "sympy", "torch._dynamo"}

# Learn a batch and checkpoint: the calls of torch.optim that import torch._dynamo.
_DEFAULT_AGENT = """
import json, sys, tempfile
import agent.daemon
from agent.checkpoint import save_checkpoint
from agent.learner import Learner
from agent.models import build_model
import torch
learner = Learner(build_model("mlp4", 10, seed=0), num_classes=10)
learner.process_batch(torch.rand(8, 784), torch.randint(0, 10, (8,)))
with tempfile.TemporaryDirectory() as tmp:
    save_checkpoint(tmp + "/a.ckpt.npz", learner)
print(json.dumps(sorted(sys.modules)))
"""


@pytest.mark.timeout(120)
def test_a_default_agent_loads_no_optional_package():
    # A fresh interpreter: the test session itself has imported everything by now.
    out = subprocess.run(
        [sys.executable, "-c", _DEFAULT_AGENT], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr[-2000:]
    loaded = json.loads(out.stdout.splitlines()[-1])
    assert {m for m in OPTIONAL for name in loaded if name == m or name.startswith(m + ".")} == set()
