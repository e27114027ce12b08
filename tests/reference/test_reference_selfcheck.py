#!/usr/bin/python3
"""Tests for llama_reference.py: the built-in self-check, CLI speed and loud failures.

Run: /usr/bin/python3 -m unittest tests/reference/test_reference_selfcheck.py -v
 (or /usr/bin/python3 tests/reference/test_reference_selfcheck.py)
"""

import json
import math
import os
import subprocess
import sys
import tempfile
import time
import unittest

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
SCRIPT = os.path.join(HERE, "llama_reference.py")
sys.dont_write_bytecode = True  # keep the source tree clean
sys.path.insert(0, HERE)
import llama_reference as R  # noqa: E402

PY = "/usr/bin/python3" if os.path.exists("/usr/bin/python3") else sys.executable


def write_tiny(tmp, hidden=64, layers=4, heads=4, kv=2, inter=96, vocab=100, d_sae=128, seed=7):
    """Writes a random bf16 model (single file) and two SAEs; returns (model_dir, sae_dirs)."""
    g = torch.Generator().manual_seed(seed)
    hd = hidden // heads
    cfg = {"hidden_size": hidden, "intermediate_size": inter, "num_hidden_layers": layers,
           "num_attention_heads": heads, "num_key_value_heads": kv, "head_dim": hd,
           "vocab_size": vocab, "rms_norm_eps": 1e-5, "rope_theta": 500000.0, "hidden_act": "silu",
           "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                            "high_freq_factor": 4.0, "original_max_position_embeddings": 64}}
    mdir = os.path.join(tmp, "model")
    os.makedirs(mdir)
    with open(os.path.join(mdir, "config.json"), "w") as fh:
        json.dump(cfg, fh)
    shapes = {"model.embed_tokens.weight": [vocab, hidden], "model.norm.weight": [hidden],
              "lm_head.weight": [vocab, hidden]}
    for n in range(layers):
        p = "model.layers.%d." % n
        shapes.update({p + "input_layernorm.weight": [hidden],
                       p + "post_attention_layernorm.weight": [hidden],
                       p + "self_attn.q_proj.weight": [heads * hd, hidden],
                       p + "self_attn.k_proj.weight": [kv * hd, hidden],
                       p + "self_attn.v_proj.weight": [kv * hd, hidden],
                       p + "self_attn.o_proj.weight": [hidden, heads * hd],
                       p + "mlp.gate_proj.weight": [inter, hidden],
                       p + "mlp.up_proj.weight": [inter, hidden],
                       p + "mlp.down_proj.weight": [hidden, inter]})
    ents = []
    for name in sorted(shapes):
        t = torch.randn(shapes[name], generator=g, dtype=torch.float64) / math.sqrt(shapes[name][-1])
        if "norm" in name:
            t = 1.0 + 0.1 * torch.randn(shapes[name], generator=g, dtype=torch.float64)
        ents.append((name, "BF16", shapes[name], R._to_bf16_bytes(t)[0]))
    R._write_raw_safetensors(os.path.join(mdir, "model.safetensors"), ents)
    sae_dirs = []
    for name, point in (("L1R-8x", "blocks.1.hook_resid_post"), ("L3TC-8x", "blocks.3.ln2.hook_normalized")):
        sd = os.path.join(tmp, "saes", name)
        os.makedirs(os.path.join(sd, "checkpoints"))
        hp = {"d_model": hidden, "d_sae": d_sae, "act_fn": "jumprelu", "jump_relu_threshold": 0.5,
              "top_k": 50, "norm_activation": "dataset-wise",
              "dataset_average_activation_norm": {"in": 5.0, "out": 3.0},
              "sparsity_include_decoder_norm": True, "hook_point_in": point, "hook_point_out": point}
        with open(os.path.join(sd, "hyperparams.json"), "w") as fh:
            json.dump(hp, fh)
        e = []
        for tn, shp in (("encoder.weight", [d_sae, hidden]), ("encoder.bias", [d_sae]),
                        ("decoder.weight", [hidden, d_sae]), ("decoder.bias", [hidden])):
            t = 0.2 * torch.randn(shp, generator=g, dtype=torch.float64)
            e.append((tn, "BF16", shp, R._to_bf16_bytes(t)[0]))
        R._write_raw_safetensors(os.path.join(sd, "checkpoints", "final.safetensors"), e)
        sae_dirs.append(sd)
    return mdir, sae_dirs


def run_cli(*args):
    return subprocess.run([PY, SCRIPT] + list(args), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          universal_newlines=True)


class ReferenceTest(unittest.TestCase):
    def setUp(self):
        self._tmp = tempfile.TemporaryDirectory()
        self.tmp = self._tmp.name
        self.mdir, self.sae_dirs = write_tiny(self.tmp)
        self.inp = os.path.join(self.tmp, "in.jsonl")
        with open(self.inp, "w") as fh:
            for s in range(3):
                fh.write(json.dumps({"token_ids": [(7 * s + 13 * i) % 100 for i in range(20)]}) + "\n")
        self.out = os.path.join(self.tmp, "out.safetensors")

    def tearDown(self):
        self._tmp.cleanup()

    def test_selfcheck(self):
        r = run_cli("--selfcheck")
        self.assertEqual(r.returncode, 0, r.stdout + r.stderr)
        self.assertIn("selfcheck PASSED", r.stdout)

    def test_cli_fast_deterministic_and_named(self):
        args = ["--model", self.mdir, "--input", self.inp]
        for d in self.sae_dirs:
            args += ["--sae", d]
        t0 = time.time()
        r = run_cli(*(args + ["--output", self.out]))
        elapsed = time.time() - t0
        self.assertEqual(r.returncode, 0, r.stderr)
        self.assertLess(elapsed, 10.0)
        out2 = os.path.join(self.tmp, "out2.safetensors")
        self.assertEqual(run_cli(*(args + ["--output", out2])).returncode, 0)
        with open(self.out, "rb") as a, open(out2, "rb") as b:
            self.assertEqual(a.read(), b.read(), "output is not deterministic")
        st = R.SafetensorsFile(self.out)
        expect = set()
        for i in range(3):
            expect |= {"hook.L1R.%d" % i, "hook.L3TC.%d" % i}
            for n in ("L1R-8x", "L3TC-8x"):
                expect |= {"sae.%s.pre.%d" % (n, i), "sae.%s.f.%d" % (n, i)}
        self.assertEqual(set(st.names()), expect)
        for n in st.names():
            self.assertEqual(st.header[n]["dtype"], "F32")
        self.assertEqual(st.header["hook.L1R.0"]["shape"], [20, 64])
        self.assertEqual(st.header["sae.L1R-8x.f.2"]["shape"], [20, 128])
        # TC hook is RMS-normalised without weight: mean square == 1 / (1 + eps/ms) ~ 1
        tc = st.get("hook.L3TC.1")
        self.assertLess(float(((tc * tc).mean(dim=1) - 1).abs().max()), 1e-4)

    def _expect_fail(self, *args, needle):
        r = run_cli(*args)
        self.assertNotEqual(r.returncode, 0, r.stdout)
        self.assertIn(needle, r.stderr)

    def test_missing_model_tensor_fails(self):
        path = os.path.join(self.mdir, "model.safetensors")
        f = R.SafetensorsFile(path)
        ents = [(n, "BF16", f.header[n]["shape"], R._to_bf16_bytes(f.get(n))[0])
                for n in f.names() if n != "model.layers.2.mlp.up_proj.weight"]
        R._write_raw_safetensors(path, ents)
        self._expect_fail("--model", self.mdir, "--sae", self.sae_dirs[1], "--input", self.inp,
                          "--output", self.out, needle="model.layers.2.mlp.up_proj.weight")
        # a hook below the removed tensor's layer still works (only layers <= hook are loaded)
        r = run_cli("--model", self.mdir, "--sae", self.sae_dirs[0], "--input", self.inp,
                    "--output", self.out)
        self.assertEqual(r.returncode, 0, r.stderr)

    def test_missing_hyperparam_fails(self):
        hp_path = os.path.join(self.sae_dirs[0], "hyperparams.json")
        with open(hp_path) as fh:
            hp = json.load(fh)
        del hp["dataset_average_activation_norm"]
        with open(hp_path, "w") as fh:
            json.dump(hp, fh)
        self._expect_fail("--model", self.mdir, "--sae", self.sae_dirs[0], "--input", self.inp,
                          "--output", self.out, needle="dataset_average_activation_norm")

    def test_bad_input_fails(self):
        with open(self.inp, "w") as fh:
            fh.write('{"text": "hello"}\n')
        self._expect_fail("--model", self.mdir, "--sae", self.sae_dirs[0], "--input", self.inp,
                          "--output", self.out, needle="token_ids")
        with open(self.inp, "w") as fh:
            fh.write('{"token_ids": [1, 100]}\n')
        self._expect_fail("--model", self.mdir, "--sae", self.sae_dirs[0], "--input", self.inp,
                          "--output", self.out, needle="out of range")


if __name__ == "__main__":
    unittest.main()
