#!/usr/bin/python3
"""Independent float64 reference for the Llama forward pass and Llama Scope SAE encoders.

This file is correctness evidence for the C++ engine. It was written from the
published formulas, not from the C++ sources, and uses only torch, numpy and the
standard library (Debian python3-torch 1.13 works).

Usage
-----
  /usr/bin/python3 tests/reference/llama_reference.py --model DIR --sae DIR [--sae DIR ...] \
      --input IN.jsonl --output OUT.safetensors [--lm-saes-form] [--hook L3R ...] [--recon-err]
  /usr/bin/python3 tests/reference/llama_reference.py --selfcheck

IN.jsonl: one {"token_ids": [...]} per line. Every line is its own sequence, with
positions starting at 0 (no BOS is added; include it in token_ids if wanted).

OUT.safetensors (every tensor F32, computed in float64 and rounded once):
  hook.<HOOK>.<i>      [n_tokens, d_model]  hook activation for line i (HOOK = L3R, L3A, L3M, L3TC)
  sae.<NAME>.pre.<i>   [n_tokens, d_sae]    value before thresholding (h, or h'' with --lm-saes-form)
  sae.<NAME>.f.<i>     [n_tokens, d_sae]    feature activation after JumpReLU / TopK
  sae.<NAME>.recon_err.<i>  [n_tokens]      with --recon-err: fraction of variance unexplained
                                            (also writes hook.<HOOK_OUT>.<i>, the target)
NAME is the SAE folder name (trailing slashes ignored). All token positions are
written, BOS included; drop position 0 yourself when comparing with output that
excludes BOS.

Formulas and where they come from (restated in our own words)
---------------------------------------------------------------
Llama decoder (Hugging Face transformers, LlamaForCausalLM / modeling_llama.py,
and the rope-init helper in modeling_rope_utils.py for "llama3" scaling):
  * Linear layers store the weight as [out, in]: y = x @ W^T. No biases unless the
    config sets attention_bias / mlp_bias (then the *.bias tensors are required).
  * RMSNorm(x) = x / sqrt(mean_j(x_j^2) + eps) * w, eps = config.rms_norm_eps.
  * Layer n, with h the residual stream entering it:
        a      = input_layernorm(h)
        q,k,v  = a Wq^T, a Wk^T, a Wv^T, split into heads of size head_dim
        q,k    = RoPE(q), RoPE(k)
        attn   = causal softmax(q k^T / sqrt(head_dim)) v   (query head i reads kv head
                 i // (n_heads / n_kv_heads), i.e. grouped-query attention)
        A      = concat_heads(attn) Wo^T                     -> hook L{n}A
        mid    = h + A                                       (resid_mid)
        TC     = mid / sqrt(mean(mid^2) + eps)               -> hook L{n}TC (no norm weight)
        M      = Wdown (silu(Wgate m) * (Wup m)), m = post_attention_layernorm(mid)
                                                             -> hook L{n}M
        h'     = mid + M                                     -> hook L{n}R
    silu(z) = z * sigmoid(z). The final model.norm is not applied to any hook.
  * RoPE, half-split ("rotate_half") layout used by HF checkpoints: for a head vector
    x of size d, pair element j with element j + d/2 (j < d/2):
        x'_j       = x_j cos(p w_j) - x_{j+d/2} sin(p w_j)
        x'_{j+d/2} = x_{j+d/2} cos(p w_j) + x_j sin(p w_j)
    with p the position. The frequencies follow HF exactly, in float32:
        w_j = 1 / theta^(2j/d)                 (float32, as torch computes it)
    and with rope_scaling.rope_type == "llama3" (factor F, low_freq_factor l,
    high_freq_factor hf, original_max_position_embeddings L):
        wavelen = 2 pi / w_j ; low = L / l ; high = L / hf
        wavelen > low  -> w_j / F
        wavelen < high -> w_j
        otherwise      -> s = (L / wavelen - l) / (hf - l); (1 - s) w_j / F + s w_j
    The angle p * w_j is formed in float32 (as HF does); its cos/sin are then taken
    in float64.
  * Weights are upcast to float64 and the whole forward runs in float64, so this is
    a high-precision target rather than a bit-for-bit imitation of bf16 inference.

Llama Scope SAEs (Llama Scope paper, He et al. 2024, and its lm_saes release; the
default form is the SAELens / Neuronpedia conversion of the same checkpoints):
  * Hook from hyperparams.hook_point_in: blocks.N.hook_resid_post -> L{N}R,
    blocks.N.hook_attn_out -> L{N}A, blocks.N.hook_mlp_out -> L{N}M,
    blocks.N.ln2.hook_normalized -> L{N}TC.
  * s_in = sqrt(d_model) / dataset_average_activation_norm.in and
    s_out = sqrt(d_model) / dataset_average_activation_norm.out when
    norm_activation == "dataset-wise"; both are 1 when it is "none".
  * Default (SAELens) form:  h_i = w_i . (s_in x) + b_i  (w_i = row i of encoder.weight)
        jumprelu: f_i = h_i if h_i > theta * s_in else 0   (theta = jump_relu_threshold)
  * --lm-saes-form:          h''_i = ||d_i|| * (w_i . (s_in x) + b_i) / s_out
        (d_i = column i of decoder.weight, which is [d_model, d_sae])
        jumprelu: f_i = h''_i if h''_i > theta else 0
  * act_fn "topk" (either form): f keeps the top_k largest pre-activations that are
    also > 0 and zeroes the rest (ties broken toward the lower feature index).
  * Reconstruction ("form B"), with --recon-err: for the features active under the
    chosen form's rule (f_i != 0 above; ALL of them, not a top-k),
        y_hat = (sum_i h_i d_i + b_dec) / s_out,   h_i = w_i . (s_in x) + b_i
    (h is the SAELens-form value in both forms; b_dec = decoder.bias), and
        recon_err = ||y - y_hat||^2 / ||y||^2      per token (fraction of variance unexplained)
    where y is the activation at hyperparams.hook_point_out (the input hook for R/A/M
    SAEs; blocks.N.hook_mlp_out, i.e. L{N}M, for transcoders).
"""

import argparse
import json
import math
import os
import re
import struct
import sys
import tempfile

import numpy as np
import torch


class ReferenceError_(Exception):
    """A user-facing failure: bad input, missing tensor or config field."""


def fail(msg):
    raise ReferenceError_(msg)


# ----------------------------------------------------------------------------
# safetensors
# ----------------------------------------------------------------------------

_NP_DTYPES = {"F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": np.uint16}
_ITEMSIZE = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2}


class SafetensorsFile:
    """Lazily reads tensors from one .safetensors file (memory-mapped)."""

    def __init__(self, path):
        self.path = path
        try:
            size = os.path.getsize(path)
            with open(path, "rb") as fh:
                raw = fh.read(8)
                if len(raw) != 8:
                    fail("%s: file too short for a safetensors header" % path)
                (hlen,) = struct.unpack("<Q", raw)
                if hlen > size - 8:
                    fail("%s: header length %d exceeds file size %d" % (path, hlen, size))
                header = json.loads(fh.read(hlen).decode("utf-8"))
        except OSError as e:
            fail("%s: cannot read: %s" % (path, e))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            fail("%s: bad safetensors header: %s" % (path, e))
        self.data_start = 8 + hlen
        self.data_size = size - self.data_start
        header.pop("__metadata__", None)
        self.header = header
        self._mm = None

    def names(self):
        return list(self.header.keys())

    def get(self, name):
        """Returns the tensor as a float64 torch tensor."""
        if name not in self.header:
            fail("%s: missing tensor %r" % (self.path, name))
        info = self.header[name]
        dtype, shape, (begin, end) = info["dtype"], info["shape"], info["data_offsets"]
        if dtype not in _NP_DTYPES:
            fail("%s: tensor %r has unsupported dtype %s" % (self.path, name, dtype))
        n = int(np.prod(shape)) if shape else 1
        if end - begin != n * _ITEMSIZE[dtype] or end > self.data_size or begin < 0:
            fail("%s: tensor %r has inconsistent offsets %s for shape %s %s"
                 % (self.path, name, [begin, end], shape, dtype))
        if self._mm is None:
            self._mm = np.memmap(self.path, dtype=np.uint8, mode="r")
        buf = np.asarray(self._mm[self.data_start + begin:self.data_start + end])
        arr = buf.view(_NP_DTYPES[dtype]).reshape(shape)
        if dtype == "BF16":
            # bf16 is the top half of an IEEE float32: shift the bits back up.
            f32 = (arr.astype(np.uint32) << np.uint32(16)).view(np.float32)
            return torch.from_numpy(f32.astype(np.float64))
        return torch.from_numpy(np.array(arr, dtype=np.float64))


def write_safetensors(path, tensors, dtype="F32"):
    """tensors: dict name -> torch/numpy array. Written in sorted name order."""
    npdt = {"F32": np.float32, "F64": np.float64}[dtype]
    header, blobs, off = {}, [], 0
    for name in sorted(tensors):
        t = tensors[name]
        a = t.detach().cpu().numpy() if isinstance(t, torch.Tensor) else np.asarray(t)
        a = np.ascontiguousarray(a.astype(npdt))
        b = a.tobytes()
        header[name] = {"dtype": dtype, "shape": list(a.shape), "data_offsets": [off, off + len(b)]}
        blobs.append(b)
        off += len(b)
    hjson = json.dumps(header, separators=(",", ":")).encode("utf-8")
    hjson += b" " * ((8 - len(hjson) % 8) % 8)
    tmp = path + ".tmp"
    with open(tmp, "wb") as fh:
        fh.write(struct.pack("<Q", len(hjson)))
        fh.write(hjson)
        for b in blobs:
            fh.write(b)
    os.replace(tmp, path)


class WeightStore:
    """All tensors of a HF model folder (sharded via the index, or every *.safetensors)."""

    def __init__(self, model_dir):
        self.files = {}
        self.where = {}
        index = os.path.join(model_dir, "model.safetensors.index.json")
        if os.path.exists(index):
            try:
                with open(index) as fh:
                    wmap = json.load(fh)["weight_map"]
            except (OSError, ValueError, KeyError) as e:
                fail("%s: cannot read weight_map: %s" % (index, e))
            for name, fname in wmap.items():
                self.where[name] = os.path.join(model_dir, fname)
        else:
            shards = sorted(f for f in os.listdir(model_dir) if f.endswith(".safetensors"))
            if not shards:
                fail("%s: no model.safetensors.index.json and no *.safetensors files" % model_dir)
            for f in shards:
                p = os.path.join(model_dir, f)
                for name in self._file(p).names():
                    self.where[name] = p

    def _file(self, path):
        if path not in self.files:
            if not os.path.exists(path):
                fail("missing weight file %s" % path)
            self.files[path] = SafetensorsFile(path)
        return self.files[path]

    def get(self, name, shape):
        if name not in self.where:
            fail("model weight %r not found (not in the index / any shard)" % name)
        t = self._file(self.where[name]).get(name)
        if list(t.shape) != list(shape):
            fail("model weight %r has shape %s, expected %s" % (name, list(t.shape), list(shape)))
        return t


# ----------------------------------------------------------------------------
# config
# ----------------------------------------------------------------------------

def _req(d, key, origin):
    if key not in d or d[key] is None:
        fail("%s: missing field %r" % (origin, key))
    return d[key]


class Config:
    def __init__(self, raw, origin="config.json"):
        self.hidden = int(_req(raw, "hidden_size", origin))
        self.inter = int(_req(raw, "intermediate_size", origin))
        self.n_layers = int(_req(raw, "num_hidden_layers", origin))
        self.n_heads = int(_req(raw, "num_attention_heads", origin))
        self.n_kv = int(raw.get("num_key_value_heads") or self.n_heads)
        self.head_dim = int(raw.get("head_dim") or self.hidden // self.n_heads)
        self.vocab = int(_req(raw, "vocab_size", origin))
        self.eps = float(_req(raw, "rms_norm_eps", origin))
        self.theta = float(raw.get("rope_theta", 10000.0))
        self.attention_bias = bool(raw.get("attention_bias", False))
        self.mlp_bias = bool(raw.get("mlp_bias", False))
        act = raw.get("hidden_act", "silu")
        if act != "silu":
            fail("%s: hidden_act %r is not supported (only silu)" % (origin, act))
        if self.n_heads % self.n_kv != 0:
            fail("%s: num_attention_heads %d not divisible by num_key_value_heads %d"
                 % (origin, self.n_heads, self.n_kv))
        if self.head_dim % 2 != 0:
            fail("%s: head_dim %d must be even" % (origin, self.head_dim))
        rs = raw.get("rope_scaling")
        self.rope_type = "default"
        if rs:
            self.rope_type = rs.get("rope_type", rs.get("type", "default"))
            if self.rope_type == "llama3":
                self.rope_factor = float(_req(rs, "factor", origin + ":rope_scaling"))
                self.low_freq_factor = float(_req(rs, "low_freq_factor", origin + ":rope_scaling"))
                self.high_freq_factor = float(_req(rs, "high_freq_factor", origin + ":rope_scaling"))
                self.old_ctx = float(_req(rs, "original_max_position_embeddings", origin + ":rope_scaling"))
            elif self.rope_type != "default":
                fail("%s: rope_scaling type %r is not supported" % (origin, self.rope_type))

    @staticmethod
    def from_dir(model_dir):
        path = os.path.join(model_dir, "config.json")
        try:
            with open(path) as fh:
                raw = json.load(fh)
        except (OSError, ValueError) as e:
            fail("%s: cannot read: %s" % (path, e))
        return Config(raw, path)


def rope_inv_freq(cfg):
    """float32 inverse frequencies [head_dim/2], exactly as HF builds them."""
    d = cfg.head_dim
    inv = 1.0 / (cfg.theta ** (torch.arange(0, d, 2, dtype=torch.int64).float() / d))
    assert inv.dtype == torch.float32
    if cfg.rope_type != "llama3":
        return inv
    low_wl = cfg.old_ctx / cfg.low_freq_factor
    high_wl = cfg.old_ctx / cfg.high_freq_factor
    wavelen = 2 * math.pi / inv
    out = torch.where(wavelen > low_wl, inv / cfg.rope_factor, inv)
    smooth = (cfg.old_ctx / wavelen - cfg.low_freq_factor) / (cfg.high_freq_factor - cfg.low_freq_factor)
    smoothed = (1 - smooth) * out / cfg.rope_factor + smooth * out
    medium = ~(wavelen < high_wl) & ~(wavelen > low_wl)
    out = torch.where(medium, smoothed, out)
    assert out.dtype == torch.float32
    return out


def rope_cos_sin(cfg, n_tokens):
    """cos, sin as float64 [n_tokens, head_dim/2]; angles formed in float32."""
    inv = rope_inv_freq(cfg)
    pos = torch.arange(n_tokens, dtype=torch.float32)
    ang = pos[:, None] * inv[None, :]  # float32, like HF's fp32 outer product
    ang = ang.double()
    return torch.cos(ang), torch.sin(ang)


# ----------------------------------------------------------------------------
# model
# ----------------------------------------------------------------------------

HOOK_RE = re.compile(r"^L(\d+)(R|A|M|TC)$")


class Model:
    def __init__(self, cfg, weights, n_layers_needed):
        """weights: callable(name, shape) -> float64 tensor."""
        self.cfg = cfg
        c = cfg
        qd, kd = c.n_heads * c.head_dim, c.n_kv * c.head_dim
        self.embed = weights("model.embed_tokens.weight", [c.vocab, c.hidden])
        self.layers = []
        for n in range(n_layers_needed):
            p = "model.layers.%d." % n
            L = {
                "ln1": weights(p + "input_layernorm.weight", [c.hidden]),
                "ln2": weights(p + "post_attention_layernorm.weight", [c.hidden]),
                "q": weights(p + "self_attn.q_proj.weight", [qd, c.hidden]),
                "k": weights(p + "self_attn.k_proj.weight", [kd, c.hidden]),
                "v": weights(p + "self_attn.v_proj.weight", [kd, c.hidden]),
                "o": weights(p + "self_attn.o_proj.weight", [c.hidden, qd]),
                "gate": weights(p + "mlp.gate_proj.weight", [c.inter, c.hidden]),
                "up": weights(p + "mlp.up_proj.weight", [c.inter, c.hidden]),
                "down": weights(p + "mlp.down_proj.weight", [c.hidden, c.inter]),
            }
            if c.attention_bias:
                for nm, sz in (("q", qd), ("k", kd), ("v", kd), ("o", c.hidden)):
                    L[nm + "_b"] = weights(p + "self_attn.%s_proj.bias" % nm, [sz])
            if c.mlp_bias:
                for nm, sz in (("gate", c.inter), ("up", c.inter), ("down", c.hidden)):
                    L[nm + "_b"] = weights(p + "mlp.%s_proj.bias" % nm, [sz])
            self.layers.append(L)


def _lin(x, L, name):
    y = x @ L[name].t()
    if name + "_b" in L:
        y = y + L[name + "_b"]
    return y


def rms_normalize(x, eps):
    return x * torch.rsqrt((x * x).mean(dim=-1, keepdim=True) + eps)


def apply_rope(x, cos, sin):
    """x [T, H, D] half-split layout; cos/sin [T, D/2]."""
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    c, s = cos[:, None, :], sin[:, None, :]
    return torch.cat([x1 * c - x2 * s, x2 * c + x1 * s], dim=-1)


def attention_batched(q, k, v, n_heads, n_kv):
    """q [T,H,D], k/v [T,KV,D] -> [T,H*D]; causal, GQA."""
    T, _, D = q.shape
    group = n_heads // n_kv
    kx = k.repeat_interleave(group, dim=1)  # head h -> kv head h // group
    vx = v.repeat_interleave(group, dim=1)
    scores = torch.einsum("thd,shd->hts", q, kx) / math.sqrt(D)
    mask = torch.ones(T, T, dtype=torch.bool).triu(1)
    scores = scores.masked_fill(mask[None], float("-inf"))
    p = torch.softmax(scores, dim=-1)
    out = torch.einsum("hts,shd->thd", p, vx)
    return out.reshape(T, n_heads * D)


def forward(model, token_ids, hooks, attention=attention_batched):
    """Runs layers 0..max hooked layer; returns {hook name: [T, hidden] float64}."""
    c = model.cfg
    for t in token_ids:
        if not (0 <= t < c.vocab):
            fail("token id %d out of range [0, %d)" % (t, c.vocab))
    ids = torch.tensor(token_ids, dtype=torch.long)
    T = len(token_ids)
    cos, sin = rope_cos_sin(c, T)
    h = model.embed[ids]
    wanted = {}
    for name in hooks:
        m = HOOK_RE.match(name)
        wanted.setdefault(int(m.group(1)), set()).add(m.group(2))
    last = max(wanted) if wanted else -1
    out = {}
    for n in range(last + 1):
        L = model.layers[n]
        a = rms_normalize(h, c.eps) * L["ln1"]
        q = _lin(a, L, "q").view(T, c.n_heads, c.head_dim)
        k = _lin(a, L, "k").view(T, c.n_kv, c.head_dim)
        v = _lin(a, L, "v").view(T, c.n_kv, c.head_dim)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        attn = _lin(attention(q, k, v, c.n_heads, c.n_kv), L, "o")
        mid = h + attn
        tc = rms_normalize(mid, c.eps)
        m_in = tc * L["ln2"]
        mlp = _lin(torch.nn.functional.silu(_lin(m_in, L, "gate")) * _lin(m_in, L, "up"), L, "down")
        h = mid + mlp
        got = wanted.get(n, ())
        for kind, val in (("A", attn), ("TC", tc), ("M", mlp), ("R", h)):
            if kind in got:
                out["L%d%s" % (n, kind)] = val.clone()
    return out


# ----------------------------------------------------------------------------
# SAE
# ----------------------------------------------------------------------------

_HOOK_POINTS = [
    (re.compile(r"^blocks\.(\d+)\.hook_resid_post$"), "R"),
    (re.compile(r"^blocks\.(\d+)\.hook_attn_out$"), "A"),
    (re.compile(r"^blocks\.(\d+)\.hook_mlp_out$"), "M"),
    (re.compile(r"^blocks\.(\d+)\.ln2\.hook_normalized$"), "TC"),
]


def hook_from_point(point, origin):
    for rx, kind in _HOOK_POINTS:
        m = rx.match(point)
        if m:
            return "L%d%s" % (int(m.group(1)), kind)
    fail("%s: unsupported hook point %r" % (origin, point))


class Sae:
    def __init__(self, name, hp, w_enc, b_enc, w_dec, origin="sae", b_dec=None):
        """hp: parsed hyperparams dict; tensors float64 (w_dec may be None unless lm-saes form;
        b_dec is only needed for reconstructions)."""
        self.name = name
        self.d_model = int(_req(hp, "d_model", origin))
        self.d_sae = int(_req(hp, "d_sae", origin))
        self.act_fn = _req(hp, "act_fn", origin)
        self.hook = hook_from_point(_req(hp, "hook_point_in", origin), origin)
        self.hook_out = hook_from_point(hp.get("hook_point_out") or hp["hook_point_in"], origin)
        if self.act_fn == "jumprelu":
            self.theta = float(_req(hp, "jump_relu_threshold", origin))
        elif self.act_fn == "topk":
            self.top_k = int(_req(hp, "top_k", origin))
            if self.top_k <= 0:
                fail("%s: top_k must be positive, got %d" % (origin, self.top_k))
        else:
            fail("%s: unsupported act_fn %r (expected jumprelu or topk)" % (origin, self.act_fn))
        norm = _req(hp, "norm_activation", origin)
        if norm == "dataset-wise":
            avg = _req(hp, "dataset_average_activation_norm", origin)
            a_in = float(_req(avg, "in", origin + ":dataset_average_activation_norm"))
            a_out = float(_req(avg, "out", origin + ":dataset_average_activation_norm"))
            if a_in <= 0 or a_out <= 0:
                fail("%s: dataset_average_activation_norm must be positive" % origin)
            self.s_in = math.sqrt(self.d_model) / a_in
            self.s_out = math.sqrt(self.d_model) / a_out
        elif norm == "none":
            self.s_in = self.s_out = 1.0
        else:
            fail("%s: unsupported norm_activation %r" % (origin, norm))
        if list(w_enc.shape) != [self.d_sae, self.d_model]:
            fail("%s: encoder.weight shape %s != [d_sae %d, d_model %d]"
                 % (origin, list(w_enc.shape), self.d_sae, self.d_model))
        if list(b_enc.shape) != [self.d_sae]:
            fail("%s: encoder.bias shape %s != [%d]" % (origin, list(b_enc.shape), self.d_sae))
        if w_dec is not None and list(w_dec.shape) != [self.d_model, self.d_sae]:
            fail("%s: decoder.weight shape %s != [d_model %d, d_sae %d]"
                 % (origin, list(w_dec.shape), self.d_model, self.d_sae))
        if b_dec is not None and list(b_dec.shape) != [self.d_model]:
            fail("%s: decoder.bias shape %s != [%d]" % (origin, list(b_dec.shape), self.d_model))
        self.w_enc, self.b_enc, self.w_dec, self.b_dec = w_enc, b_enc, w_dec, b_dec

    @staticmethod
    def from_dir(sae_dir, need_decoder, need_decoder_bias=False):
        name = os.path.basename(os.path.normpath(sae_dir))
        hp_path = os.path.join(sae_dir, "hyperparams.json")
        try:
            with open(hp_path) as fh:
                hp = json.load(fh)
        except (OSError, ValueError) as e:
            fail("%s: cannot read: %s" % (hp_path, e))
        ck = os.path.join(sae_dir, "checkpoints", "final.safetensors")
        if not os.path.exists(ck):
            fail("%s: missing checkpoint file" % ck)
        st = SafetensorsFile(ck)
        w_dec = st.get("decoder.weight") if need_decoder or need_decoder_bias else None
        b_dec = st.get("decoder.bias") if need_decoder_bias else None
        return Sae(name, hp, st.get("encoder.weight"), st.get("encoder.bias"), w_dec, hp_path, b_dec)

    def encode(self, x, lm_saes_form):
        """x [T, d_model] float64 -> (pre, f) float64 [T, d_sae]."""
        pre = (self.s_in * x) @ self.w_enc.t() + self.b_enc
        if lm_saes_form:
            if self.w_dec is None:
                fail("SAE %s: decoder.weight needed for --lm-saes-form" % self.name)
            pre = pre * self.w_dec.norm(dim=0) / self.s_out
        if self.act_fn == "jumprelu":
            thr = self.theta if lm_saes_form else self.theta * self.s_in
            f = torch.where(pre > thr, pre, torch.zeros_like(pre))
        else:
            f = topk_activation(pre, self.top_k)
        return pre, f

    def recon_err(self, x, y, lm_saes_form):
        """x: input hook [T, d_model], y: hook_point_out [T, d_model] -> [T] float64."""
        if self.w_dec is None or self.b_dec is None:
            fail("SAE %s: decoder.weight and decoder.bias are needed for --recon-err" % self.name)
        pre, f = self.encode(x, lm_saes_form)
        if self.act_fn == "jumprelu":
            active = pre > (self.theta if lm_saes_form else self.theta * self.s_in)
        else:
            active = f != 0
        h = (self.s_in * x) @ self.w_enc.t() + self.b_enc  # SAELens-form value in both forms
        y_hat = ((h * active) @ self.w_dec.t() + self.b_dec) / self.s_out
        return ((y - y_hat) ** 2).sum(dim=1) / (y * y).sum(dim=1)


def topk_activation(pre, k):
    """Keep the k largest entries per row that are also > 0 (ties -> lower index)."""
    a = pre.numpy()
    f = np.zeros_like(a)
    k = min(k, a.shape[1])
    for r in range(a.shape[0]):
        order = np.argsort(-a[r], kind="stable")[:k]
        keep = order[a[r, order] > 0]
        f[r, keep] = a[r, keep]
    return torch.from_numpy(f)


# ----------------------------------------------------------------------------
# driver
# ----------------------------------------------------------------------------

def read_inputs(path):
    seqs = []
    try:
        with open(path) as fh:
            lines = fh.read().splitlines()
    except OSError as e:
        fail("%s: cannot read: %s" % (path, e))
    for ln, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except ValueError as e:
            fail("%s:%d: bad JSON: %s" % (path, ln, e))
        if not isinstance(obj, dict) or "token_ids" not in obj:
            fail("%s:%d: expected an object with \"token_ids\" (no tokenizer here)" % (path, ln))
        ids = obj["token_ids"]
        if not isinstance(ids, list) or not ids or not all(isinstance(t, int) for t in ids):
            fail("%s:%d: token_ids must be a non-empty list of integers" % (path, ln))
        seqs.append(ids)
    if not seqs:
        fail("%s: no input lines" % path)
    return seqs


def run(model, saes, seqs, extra_hooks, lm_saes_form, recon=False):
    targets = [s.hook_out for s in saes] if recon else []
    hooks = sorted(set([s.hook for s in saes] + targets + list(extra_hooks)))
    out = {}
    for i, ids in enumerate(seqs):
        acts = forward(model, ids, hooks)
        for hname in hooks:
            out["hook.%s.%d" % (hname, i)] = acts[hname]
        for s in saes:
            pre, f = s.encode(acts[s.hook], lm_saes_form)
            out["sae.%s.pre.%d" % (s.name, i)] = pre
            out["sae.%s.f.%d" % (s.name, i)] = f
            if recon:
                out["sae.%s.recon_err.%d" % (s.name, i)] = s.recon_err(acts[s.hook], acts[s.hook_out], lm_saes_form)
    return out


def main_cli(args):
    if not args.model or not args.input or not args.output:
        fail("--model, --input and --output are required (or use --selfcheck)")
    if not args.sae and not args.hook:
        fail("give at least one --sae (or --hook)")
    torch.set_num_threads(1)  # deterministic reduction order
    cfg = Config.from_dir(args.model)
    recon = bool(getattr(args, "recon_err", False))
    saes = [Sae.from_dir(d, args.lm_saes_form, recon) for d in (args.sae or [])]
    names = [s.name for s in saes]
    if len(set(names)) != len(names):
        fail("two --sae folders share the name %s" % names)
    for h in args.hook or []:
        if not HOOK_RE.match(h):
            fail("bad --hook %r (expected like L3R, L3A, L3M, L3TC)" % h)
    hooks = set([s.hook for s in saes] + list(args.hook or []) + ([s.hook_out for s in saes] if recon else []))
    last = max(int(HOOK_RE.match(h).group(1)) for h in hooks)
    if last >= cfg.n_layers:
        fail("hook layer %d but the model has %d layers" % (last, cfg.n_layers))
    for s in saes:
        if s.d_model != cfg.hidden:
            fail("SAE %s: d_model %d != model hidden_size %d" % (s.name, s.d_model, cfg.hidden))
    store = WeightStore(args.model)
    model = Model(cfg, store.get, last + 1)
    seqs = read_inputs(args.input)
    out = run(model, saes, seqs, args.hook or [], args.lm_saes_form, recon)
    write_safetensors(args.output, out, "F32")
    print("wrote %d tensors for %d sequences to %s" % (len(out), len(seqs), args.output))


# ----------------------------------------------------------------------------
# self-check: naive loops vs the batched path, plus a file round trip
# ----------------------------------------------------------------------------

def naive_forward(model, token_ids, hooks):
    """Per-token, per-head scalar-loop reference; shares no reshape/einsum code."""
    c = model.cfg
    D, half, grp = c.head_dim, c.head_dim // 2, c.n_heads // c.n_kv
    inv = [float(x) for x in rope_inv_freq(c)]

    def rms(vec, w):
        ms = sum(float(z) * float(z) for z in vec) / len(vec)
        r = 1.0 / math.sqrt(ms + c.eps)
        return torch.tensor([float(vec[j]) * r * (1.0 if w is None else float(w[j]))
                             for j in range(len(vec))], dtype=torch.float64)

    def matvec(W, x):
        return torch.stack([torch.dot(W[o], x) for o in range(W.shape[0])])

    def rope(vec, pos):
        outv = vec.clone()
        for j in range(half):
            # angle formed in float32 like HF, cos/sin in float64
            ang = float(np.float32(pos) * np.float32(inv[j]))
            cs, sn = math.cos(ang), math.sin(ang)
            x1, x2 = float(vec[j]), float(vec[j + half])
            outv[j] = x1 * cs - x2 * sn
            outv[j + half] = x2 * cs + x1 * sn
        return outv

    T = len(token_ids)
    hs = [model.embed[t].clone() for t in token_ids]
    out = {}
    wanted = {}
    for name in hooks:
        m = HOOK_RE.match(name)
        wanted.setdefault(int(m.group(1)), set()).add(m.group(2))
    for n in range(max(wanted) + 1):
        L = model.layers[n]
        qs, ks, vs = [], [], []
        for t in range(T):
            a = rms(hs[t], L["ln1"])
            q, k, v = matvec(L["q"], a), matvec(L["k"], a), matvec(L["v"], a)
            qs.append([rope(q[h * D:(h + 1) * D], t) for h in range(c.n_heads)])
            ks.append([rope(k[g * D:(g + 1) * D], t) for g in range(c.n_kv)])
            vs.append([v[g * D:(g + 1) * D] for g in range(c.n_kv)])
        new_hs, A, TC, M = [], [], [], []
        for t in range(T):
            heads = []
            for h in range(c.n_heads):
                g = h // grp
                sc = [float(torch.dot(qs[t][h], ks[s][g])) / math.sqrt(D) for s in range(t + 1)]
                mx = max(sc)
                e = [math.exp(z - mx) for z in sc]
                tot = sum(e)
                acc = torch.zeros(D, dtype=torch.float64)
                for s in range(t + 1):
                    acc = acc + (e[s] / tot) * vs[s][g]
                heads.append(acc)
            attn = matvec(L["o"], torch.cat(heads))
            mid = hs[t] + attn
            tc = rms(mid, None)
            m_in = rms(mid, L["ln2"])
            gate, up = matvec(L["gate"], m_in), matvec(L["up"], m_in)
            act = torch.tensor([float(z) / (1.0 + math.exp(-float(z))) * float(u)
                                for z, u in zip(gate, up)], dtype=torch.float64)
            mlp = matvec(L["down"], act)
            new_hs.append(mid + mlp)
            A.append(attn), TC.append(tc), M.append(mlp)
        hs = new_hs
        for kind, rows in (("A", A), ("TC", TC), ("M", M), ("R", hs)):
            if kind in wanted.get(n, ()):
                out["L%d%s" % (n, kind)] = torch.stack(rows)
    return out


def naive_encode(sae, x, lm_saes_form):
    T = x.shape[0]
    pre = torch.zeros(T, sae.d_sae, dtype=torch.float64)
    f = torch.zeros_like(pre)
    for t in range(T):
        for i in range(sae.d_sae):
            h = sum(float(sae.w_enc[i, j]) * sae.s_in * float(x[t, j]) for j in range(sae.d_model))
            h += float(sae.b_enc[i])
            if lm_saes_form:
                dn = math.sqrt(sum(float(sae.w_dec[j, i]) ** 2 for j in range(sae.d_model)))
                h = dn * h / sae.s_out
            pre[t, i] = h
        if sae.act_fn == "jumprelu":
            thr = sae.theta if lm_saes_form else sae.theta * sae.s_in
            for i in range(sae.d_sae):
                if pre[t, i] > thr:
                    f[t, i] = pre[t, i]
        else:
            ranked = sorted(range(sae.d_sae), key=lambda i: (-float(pre[t, i]), i))[:sae.top_k]
            for i in ranked:
                if pre[t, i] > 0:
                    f[t, i] = pre[t, i]
    return pre, f


def naive_recon_err(sae, x, y, lm_saes_form):
    """Per-token scalar loops: ||y - y_hat||^2 / ||y||^2 over the active features."""
    pre, f = naive_encode(sae, x, lm_saes_form)
    errs = []
    for t in range(x.shape[0]):
        y_hat = [float(sae.b_dec[c]) for c in range(sae.d_model)]
        for i in range(sae.d_sae):
            if float(f[t, i]) == 0.0:
                continue
            h = sum(float(sae.w_enc[i, j]) * sae.s_in * float(x[t, j]) for j in range(sae.d_model))
            h += float(sae.b_enc[i])
            for c in range(sae.d_model):
                y_hat[c] += h * float(sae.w_dec[c, i])
        num = sum((float(y[t, c]) - y_hat[c] / sae.s_out) ** 2 for c in range(sae.d_model))
        den = sum(float(y[t, c]) ** 2 for c in range(sae.d_model))
        errs.append(num / den)
    return torch.tensor(errs, dtype=torch.float64)


def _to_bf16_bytes(t):
    """float tensor -> bf16 raw bytes (round to nearest even), and the rounded values."""
    a = t.detach().numpy().astype(np.float32)
    bits = a.view(np.uint32).astype(np.uint64)
    rounded = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).astype(np.uint16)
    back = (rounded.astype(np.uint32) << np.uint32(16)).view(np.float32)
    return rounded.tobytes(), torch.from_numpy(back.astype(np.float64)).reshape(t.shape)


def _write_raw_safetensors(path, entries):
    """entries: list of (name, dtype, shape, bytes)."""
    header, off = {"__metadata__": {"format": "pt"}}, 0
    for name, dt, shape, b in entries:
        header[name] = {"dtype": dt, "shape": list(shape), "data_offsets": [off, off + len(b)]}
        off += len(b)
    hj = json.dumps(header).encode()
    with open(path, "wb") as fh:
        fh.write(struct.pack("<Q", len(hj)))
        fh.write(hj)
        for e in entries:
            fh.write(e[3])


def selfcheck():
    torch.set_num_threads(1)
    g = torch.Generator().manual_seed(1234)
    raw_cfg = {
        "architectures": ["LlamaForCausalLM"], "hidden_size": 64, "intermediate_size": 96,
        "num_hidden_layers": 3, "num_attention_heads": 4, "num_key_value_heads": 2,
        "head_dim": 16, "vocab_size": 100, "rms_norm_eps": 1e-5, "rope_theta": 500000.0,
        "hidden_act": "silu", "max_position_embeddings": 4096,
        # small original context so low/medium/high frequency bands all occur with d=16
        "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                         "high_freq_factor": 4.0, "original_max_position_embeddings": 64},
    }
    cfg = Config(raw_cfg, "selfcheck")
    c = cfg
    qd, kd = c.n_heads * c.head_dim, c.n_kv * c.head_dim
    shapes = {"model.embed_tokens.weight": [c.vocab, c.hidden], "model.norm.weight": [c.hidden]}
    for n in range(c.n_layers):
        p = "model.layers.%d." % n
        shapes.update({
            p + "input_layernorm.weight": [c.hidden], p + "post_attention_layernorm.weight": [c.hidden],
            p + "self_attn.q_proj.weight": [qd, c.hidden], p + "self_attn.k_proj.weight": [kd, c.hidden],
            p + "self_attn.v_proj.weight": [kd, c.hidden], p + "self_attn.o_proj.weight": [c.hidden, qd],
            p + "mlp.gate_proj.weight": [c.inter, c.hidden], p + "mlp.up_proj.weight": [c.inter, c.hidden],
            p + "mlp.down_proj.weight": [c.hidden, c.inter]})
    W, bf16 = {}, {}
    for name in sorted(shapes):
        shp = shapes[name]
        if name.endswith("layernorm.weight") or name == "model.norm.weight":
            t = 1.0 + 0.2 * torch.randn(shp, generator=g, dtype=torch.float64)
        else:
            scale = 1.0 if "embed" in name else 1.0 / math.sqrt(shp[1])
            t = scale * torch.randn(shp, generator=g, dtype=torch.float64)
        b, t = _to_bf16_bytes(t)  # use bf16-representable values so the file round trip is exact
        W[name], bf16[name] = t, b
    model = Model(cfg, lambda nm, shp: W[nm], c.n_layers)
    hooks = ["L0A", "L0R", "L1M", "L1TC", "L2A", "L2M", "L2R", "L2TC"]
    seqs = [[1, 5, 99, 42, 7, 7, 0, 63, 12, 88, 3, 50], [17, 4], [8]]

    worst = 0.0
    fails = []

    def cmp(what, a, b, tol=None):
        nonlocal worst
        d = float((a - b).abs().max()) if a.numel() else 0.0
        if tol is None:  # float64 vs float64: the 1e-9 gate
            tol = 1e-9
            worst = max(worst, d)
        status = "ok" if d <= tol else "FAIL"
        if d > tol:
            fails.append(what)
        print("  %-34s max|diff| = %.3e  %s" % (what, d, status))

    print("selfcheck: batched forward vs naive per-token loops")
    for i, ids in enumerate(seqs):
        fast = forward(model, ids, hooks)
        slow = naive_forward(model, ids, hooks)
        for h in hooks:
            cmp("seq%d %s" % (i, h), fast[h], slow[h])

    print("selfcheck: batched attention vs naive attention inside forward()")

    def naive_attention(q, k, v, n_heads, n_kv):
        T, _, D = q.shape
        outs = torch.zeros(T, n_heads * D, dtype=torch.float64)
        for t in range(T):
            for h in range(n_heads):
                g_ = h // (n_heads // n_kv)
                sc = torch.stack([torch.dot(q[t, h], k[s, g_]) for s in range(t + 1)]) / math.sqrt(D)
                p = torch.softmax(sc, dim=0)
                outs[t, h * D:(h + 1) * D] = sum(p[s] * v[s, g_] for s in range(t + 1))
        return outs

    a = forward(model, seqs[0], hooks)
    b = forward(model, seqs[0], hooks, attention=naive_attention)
    for h in hooks:
        cmp("attn-only seq0 %s" % h, a[h], b[h])

    print("selfcheck: llama3 inv_freq vs scalar float32 recomputation")
    inv = rope_inv_freq(cfg)
    f32 = np.float32
    ref = []
    for j in range(c.head_dim // 2):
        base = f32(1.0) / f32(f32(c.theta) ** f32(f32(2 * j) / f32(c.head_dim)))
        wl = f32(2 * math.pi) / base
        lo, hi = f32(c.old_ctx / c.low_freq_factor), f32(c.old_ctx / c.high_freq_factor)
        if wl > lo:
            v = base / f32(c.rope_factor)
        elif wl < hi:
            v = base
        else:
            s = (f32(c.old_ctx) / wl - f32(c.low_freq_factor)) / f32(c.high_freq_factor - c.low_freq_factor)
            v = (f32(1) - s) * base / f32(c.rope_factor) + s * base
        ref.append(float(v))
    ref = torch.tensor(ref, dtype=torch.float64)
    # float32 pow may differ from torch's by an ulp; compare relatively
    rel = float(((inv.double() - ref).abs() / ref).max())
    base_wl = 2 * math.pi / (1.0 / (c.theta ** (torch.arange(0, c.head_dim, 2).double() / c.head_dim)))
    lo_wl, hi_wl = c.old_ctx / c.low_freq_factor, c.old_ctx / c.high_freq_factor
    bands = (int((base_wl > lo_wl).sum()), int(((base_wl <= lo_wl) & (base_wl >= hi_wl)).sum()),
             int((base_wl < hi_wl).sum()))
    print("  inv_freq max relative diff = %.3e (bands: %d low-freq, %d smoothed, %d high-freq)  %s"
          % ((rel,) + bands + ("ok" if rel < 1e-6 else "FAIL",)))
    if min(bands) == 0:
        fails.append("selfcheck config does not cover all llama3 bands")
    if rel >= 1e-6:
        fails.append("inv_freq")

    print("selfcheck: files on disk (bf16 shards + index, SAE dirs) through the CLI path")
    with tempfile.TemporaryDirectory() as tmp:
        mdir = os.path.join(tmp, "model")
        os.makedirs(mdir)
        with open(os.path.join(mdir, "config.json"), "w") as fh:
            json.dump(raw_cfg, fh)
        names = sorted(shapes)
        shard_of = {}
        for si, part in enumerate((names[:len(names) // 2], names[len(names) // 2:])):
            fname = "model-%05d-of-00002.safetensors" % (si + 1)
            _write_raw_safetensors(os.path.join(mdir, fname),
                                   [(nm, "BF16", shapes[nm], bf16[nm]) for nm in part])
            for nm in part:
                shard_of[nm] = fname
        with open(os.path.join(mdir, "model.safetensors.index.json"), "w") as fh:
            json.dump({"metadata": {}, "weight_map": shard_of}, fh)

        sae_specs = [("L2R-8x", "blocks.2.hook_resid_post", "jumprelu"),
                     ("L1TC-8x", "blocks.1.ln2.hook_normalized", "jumprelu"),
                     ("L2A-8x", "blocks.2.hook_attn_out", "topk"),
                     ("L0M-8x", "blocks.0.hook_mlp_out", "jumprelu")]
        sae_dirs, mem_saes = [], []
        d_sae = 48
        for nm, point, act in sae_specs:
            # A transcoder reconstructs the MLP output of its layer.
            point_out = point.replace("ln2.hook_normalized", "hook_mlp_out")
            sd = os.path.join(tmp, "saes", nm)
            os.makedirs(os.path.join(sd, "checkpoints"))
            hp = {"d_model": c.hidden, "d_sae": d_sae, "act_fn": act, "jump_relu_threshold": 0.3,
                  "top_k": 5, "norm_activation": "dataset-wise",
                  "dataset_average_activation_norm": {"in": 3.7, "out": 2.1},
                  "sparsity_include_decoder_norm": True, "hook_point_in": point,
                  "hook_point_out": point_out}
            with open(os.path.join(sd, "hyperparams.json"), "w") as fh:
                json.dump(hp, fh)
            ents, mem = [], {}
            for tn, shp in (("encoder.weight", [d_sae, c.hidden]), ("encoder.bias", [d_sae]),
                            ("decoder.weight", [c.hidden, d_sae]), ("decoder.bias", [c.hidden])):
                t = torch.randn(shp, generator=g, dtype=torch.float64) * (0.3 if "bias" in tn else 0.25)
                b, t = _to_bf16_bytes(t)
                ents.append((tn, "BF16", shp, b))
                mem[tn] = t
            _write_raw_safetensors(os.path.join(sd, "checkpoints", "final.safetensors"), ents)
            sae_dirs.append(sd + "/")
            mem_saes.append(Sae(nm, hp, mem["encoder.weight"], mem["encoder.bias"],
                                mem["decoder.weight"], nm, mem["decoder.bias"]))
        inp = os.path.join(tmp, "in.jsonl")
        with open(inp, "w") as fh:
            for ids in seqs:
                fh.write(json.dumps({"token_ids": ids}) + "\n")

        for form in (False, True):
            outp = os.path.join(tmp, "out%d.safetensors" % form)
            ns = argparse.Namespace(model=mdir, sae=sae_dirs, input=inp, output=outp,
                                    lm_saes_form=form, hook=["L1R"], recon_err=True)
            main_cli(ns)
            st = SafetensorsFile(outp)
            expect_names = set()
            for i, ids in enumerate(seqs):
                acts = naive_forward(model, ids, [s.hook for s in mem_saes] + [s.hook_out for s in mem_saes] + ["L1R"])
                for hn, val in acts.items():
                    expect_names.add("hook.%s.%d" % (hn, i))
                    cmp("file form=%d seq%d hook %s" % (form, i, hn), st.get("hook.%s.%d" % (hn, i)),
                        val, tol=1e-6 * max(1.0, float(val.abs().max())))
                for s in mem_saes:
                    pre, f = naive_encode(s, acts[s.hook], form)
                    expect_names.update(["sae.%s.pre.%d" % (s.name, i), "sae.%s.f.%d" % (s.name, i)])
                    fpre = st.get("sae.%s.pre.%d" % (s.name, i))
                    ff = st.get("sae.%s.f.%d" % (s.name, i))
                    tol = 1e-6 * max(1.0, float(pre.abs().max()))
                    cmp("file form=%d seq%d %s pre" % (form, i, s.name), fpre, pre, tol)
                    # f: file values are float64 decisions rounded to float32
                    cmp("file form=%d seq%d %s f" % (form, i, s.name), ff, f, tol)
                    # in-memory float64 encode vs naive, exact decisions
                    rerr = naive_recon_err(s, acts[s.hook], acts[s.hook_out], form)
                    expect_names.add("sae.%s.recon_err.%d" % (s.name, i))
                    cmp("file form=%d seq%d %s recon_err" % (form, i, s.name),
                        st.get("sae.%s.recon_err.%d" % (s.name, i)), rerr, 1e-6 * max(1.0, float(rerr.abs().max())))
                    p64, f64 = s.encode(acts[s.hook], form)
                    cmp("mem  form=%d seq%d %s pre/f" % (form, i, s.name),
                        torch.cat([p64, f64]), torch.cat([pre, f]))
                    if s.act_fn == "topk":
                        nz = int((f64 != 0).sum(dim=1).max())
                        if nz > s.top_k:
                            fails.append("topk count")
            if set(st.names()) != expect_names:
                fails.append("output names")
                print("  output names mismatch: %s" % sorted(set(st.names()) ^ expect_names))
            fired = sum(int((st.get(n) != 0).sum()) for n in st.names() if ".f." in n)
            print("  form=%d: %d tensors, %d nonzero feature activations" % (form, len(st.names()), fired))

        # a missing tensor must fail loudly
        os.remove(os.path.join(sae_dirs[0], "checkpoints", "final.safetensors"))
        try:
            main_cli(argparse.Namespace(model=mdir, sae=sae_dirs, input=inp,
                                        output=os.path.join(tmp, "x.safetensors"),
                                        lm_saes_form=False, hook=[]))
            fails.append("missing checkpoint not detected")
        except ReferenceError_ as e:
            print("  missing checkpoint detected: %s" % e)

    print("selfcheck: max abs diff (naive vs batched, float64) = %.3e" % worst)
    if fails:
        print("selfcheck FAILED: %s" % ", ".join(fails))
        return 1
    print("selfcheck PASSED")
    return 0


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", help="Hugging Face Llama folder")
    ap.add_argument("--sae", action="append", help="Llama Scope SAE folder (repeatable)")
    ap.add_argument("--input", help="JSONL with {\"token_ids\": [...]} per line")
    ap.add_argument("--output", help="output .safetensors")
    ap.add_argument("--lm-saes-form", action="store_true", help="encode in the lm_saes release form")
    ap.add_argument("--hook", action="append", help="extra hook to dump, e.g. L3R (repeatable)")
    ap.add_argument("--recon-err", action="store_true",
                    help="also write sae.<NAME>.recon_err.<i> (and the target hooks)")
    ap.add_argument("--selfcheck", action="store_true", help="run the built-in self-check")
    args = ap.parse_args(argv)
    try:
        if args.selfcheck:
            return selfcheck()
        main_cli(args)
        return 0
    except ReferenceError_ as e:
        print("llama_reference.py: error: %s" % e, file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
