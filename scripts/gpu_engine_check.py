"""Engine checks on a CUDA machine (not CI): fp16 equivalence with transformers, copy/compute overlap,
and the multi-GPU layer split.

    python scripts/gpu_engine_check.py equivalence [--quantized DIR]   # one GPU
    python scripts/gpu_engine_check.py overlap                        # one GPU
    python scripts/gpu_engine_check.py split                          # two GPUs
    python scripts/gpu_engine_check.py decoder [--quantized DIR]      # Decoder + CUDA graphs (two GPUs if present)
    python scripts/gpu_engine_check.py chat [--quantized DIR] [--device D]  # ChatSession on both engines

``DIR`` is a project checkpoint made on a machine with hqq (the GPU machine has none):
``python -c "from mixtral_nb.tiny import write_tiny; ..."`` then ``mixtral_nb.quantize``.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time

import torch
from safetensors.torch import save_file

from mixtral_nb import OffloadConfig, QuantConfig, build_model
from mixtral_nb.tiny import write_tiny


def offload(slots: int, prefetch: int, layers: int, experts: int = 8) -> OffloadConfig:
    return OffloadConfig(main_size=layers * slots, offload_size=layers * (experts - slots), buffer_size=2,
                         offload_per_layer=experts - slots, prefetch=prefetch)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).abs().max() / b.float().abs().max()).item()


def equivalence(quantized: str | None) -> dict:
    from transformers import MixtralForCausalLM

    dev = torch.device("cuda:0")
    out: dict = {"unquantized": [], "quantized": None}
    d = tempfile.mkdtemp()
    write_tiny(d, seed=0)
    ref = MixtralForCausalLM.from_pretrained(d, dtype=torch.float16).to(dev).eval()
    ids = torch.randint(3, 512, (1, 64), generator=torch.Generator().manual_seed(1)).to(dev)
    with torch.no_grad():
        r = ref(ids).logits
    g_ref = ref.generate(ids[:, :8], max_new_tokens=32, do_sample=False, min_new_tokens=32)
    for slots in range(1, 9):
        for prefetch in (0, 2):
            for mirror in (True, False):
                m = build_model(dev, QuantConfig(None, None), offload(slots, prefetch, 4), d, host_mirror=mirror)
                with torch.no_grad():
                    o = m(ids).logits
                g = m.generate(ids[:, :8], max_new_tokens=32, do_sample=False, min_new_tokens=32)
                out["unquantized"].append({"slots": slots, "prefetch": prefetch, "mirror": mirror, "rel": rel(o, r),
                                           "same_tokens": bool(torch.equal(g, g_ref))})
    worst = max(x["rel"] for x in out["unquantized"])
    print(f"unquantized fp16 on cuda: worst rel logit error {worst:.2e} over {len(out['unquantized'])} configs; "
          f"greedy tokens identical in {sum(x['same_tokens'] for x in out['unquantized'])}")
    if quantized:
        m = build_model(dev, None, offload(3, 2, 4), quantized, host_mirror=True)
        cache = m.expert_cache
        tensors = {k: v.detach().float().cpu() for k, v in m.state_dict().items() if "self_attn" not in k}
        for i, layer in enumerate(m.model.layers):
            p = f"model.layers.{i}"
            for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
                tensors[f"{p}.self_attn.{proj}.weight"] = getattr(layer.self_attn, proj).dequantized().cpu()
            tensors[f"{p}.block_sparse_moe.gate.weight"] = tensors.pop(f"{p}.mlp.gate.weight")
            for e in range(cache.E):
                w1, w3, w2 = cache.fmt.dense(cache.host[cache.host_of[i][e]].to(dev))
                for name, w in (("w1", w1), ("w3", w3), ("w2", w2)):
                    tensors[f"{p}.block_sparse_moe.experts.{e}.{name}.weight"] = w.cpu()
        q = tempfile.mkdtemp()
        save_file({k: v.contiguous() for k, v in tensors.items()}, q + "/model.safetensors")
        with open(quantized + "/config.json") as f:
            cfg = json.load(f)
        with open(q + "/config.json", "w") as f:
            json.dump(cfg, f)
        qref = MixtralForCausalLM.from_pretrained(q, dtype=torch.float16).to(dev).eval()
        with torch.no_grad():
            a, b = m(ids).logits, qref(ids).logits
        out["quantized"] = rel(a, b)
        print(f"quantized (2-bit experts, 4-bit attention, fused kernels) vs transformers with the dequantized "
              f"weights, fp16 on cuda: rel logit error {out['quantized']:.2e}")
    return out


def overlap() -> dict:
    """A mid-size model whose copies take real time: waiting on copies vs total copy time."""
    dev = torch.device("cuda:0")
    d = tempfile.mkdtemp()
    write_tiny(d, seed=0, layers=8, hidden=1024, intermediate=3584, heads=8, kv_heads=2, vocab=1024)
    res = {}
    for prefetch in (0, 2):
        m = build_model(dev, QuantConfig(None, None), offload(4, prefetch, 8), d, dtype=torch.float16)
        ids = torch.randint(3, 1024, (1, 16), device=dev)
        m.generate(ids, max_new_tokens=8, do_sample=False)
        m.expert_cache.reset_stats()
        torch.cuda.synchronize()
        t = time.perf_counter()
        m.generate(ids, max_new_tokens=64, do_sample=False, min_new_tokens=64)
        torch.cuda.synchronize()
        st = m.expert_cache.stats(wait=True)
        res[prefetch] = {"seconds": time.perf_counter() - t, **st}
        print(f"prefetch={prefetch}: wait_s={st['wait_s']:.4f} h2d_s={st['h2d_s']:.4f} misses={st['misses']} "
              f"hits={st['hits']} prefetch_used={st['prefetch_used']}/{st['prefetch_issued']} "
              f"gen_s={res[prefetch]['seconds']:.3f}")
    return res


def split() -> dict:
    """Two GPUs: greedy tokens of a layer-split model equal the one-GPU model's."""
    d = tempfile.mkdtemp()
    write_tiny(d, seed=0, layers=8)
    ids = torch.randint(3, 512, (1, 16), generator=torch.Generator().manual_seed(2)).to("cuda:0")
    one = build_model("cuda:0", QuantConfig(None, None), offload(3, 2, 8), d)
    two = build_model(["cuda:0", "cuda:1"], QuantConfig(None, None), offload(3, 2, 8), d)
    with torch.no_grad():
        a, b = one(ids).logits, two(ids).logits
    ga = one.generate(ids, max_new_tokens=32, do_sample=False, min_new_tokens=32)
    gb = two.generate(ids, max_new_tokens=32, do_sample=False, min_new_tokens=32)
    res = {"rel": rel(b, a), "same_tokens": bool(torch.equal(ga, gb)),
           "devices": sorted({str(layer.mlp.experts.cache.device) for layer in two.model.layers})}
    print(f"split over {res['devices']}: rel logit error vs one GPU {res['rel']:.2e}, greedy tokens identical: "
          f"{res['same_tokens']}")
    return res


def decoder(quantized: str | None) -> dict:
    """The Decoder (CUDA graphs, static KV cache) vs transformers' forward on the same built model.

    Both run in fp16; the yardstick is transformers' forward on the model built in fp32, so the
    Decoder's error is shown next to transformers' own fp16 error.
    """
    from mixtral_nb.decoder import Decoder, DecoderConfig
    from mixtral_nb.engine import HFEngine
    from mixtral_nb.generate import generate

    def greedy(model, decoder=None):  # no min_new_tokens: transformers' generate() would mask eos
        return generate(decoder or HFEngine(model, max_length=96), ids[:, :8], 32)

    d = quantized
    if d is None:
        d = tempfile.mkdtemp()
        write_tiny(d, seed=0)
    quant = None if quantized else QuantConfig(None, None)
    ids = torch.randint(3, 512, (1, 64), generator=torch.Generator().manual_seed(1)).to("cuda:0")
    m32 = build_model("cuda:0", quant, offload(8, 0, 4), d, dtype=torch.float32)
    with torch.no_grad():
        ref = m32(ids).logits[0]
    g32 = greedy(m32)
    del m32
    devices = [["cuda:0"]] + ([["cuda:0", "cuda:1"]] if torch.cuda.device_count() > 1 else [])
    res = []
    for devs in devices:
        for slots, prefetch in ((8, 0), (3, 2), (2, 0)):
            m = build_model(devs if len(devs) > 1 else devs[0], quant, offload(slots, prefetch, 4), d,
                            dtype=torch.float16)
            with torch.no_grad():
                hf = m(ids).logits[0]
            g_hf = greedy(m)
            row = {"devices": devs, "slots": slots, "prefetch": prefetch, "engine": "transformers",
                   "rel": rel(hf[39:64], ref[39:64]), "agree_fp32_greedy": float((g_hf == g32).float().mean())}
            res.append(row)
            print(row)
            for graphs in (True, False):
                dec = Decoder(m, DecoderConfig(max_len=96, bucket=32, cuda_graphs=graphs))
                got = [dec.forward(ids[:, :40])] + [dec.forward(ids[:, t:t + 1]) for t in range(40, 64)]
                toks = greedy(m, dec)
                row = {"devices": devs, "slots": slots, "prefetch": prefetch, "engine": "decoder",
                       "graphs": graphs,
                       "static": dec.static, "rel": rel(torch.cat(got), ref[39:64]),
                       "rel_vs_fp16_transformers": rel(torch.cat(got), hf[39:64]),
                       "agree_fp32_greedy": float((toks == g32).float().mean()),
                       "same_as_fp16_transformers": bool(torch.equal(toks, g_hf))}
                res.append(row)
                print(row)
    for eng in ("transformers", "decoder"):
        rows = [r for r in res if r["engine"] == eng]
        print(f"{eng} fp16 vs fp32 reference ({'quantized' if quantized else 'unquantized'}): worst rel logit error "
              f"{max(r['rel'] for r in rows):.2e}; greedy tokens agreeing with fp32: "
              f"{min(r['agree_fp32_greedy'] for r in rows):.2f} (worst config)")
    return {"rows": res}


def _byte_tokenizer():
    """A byte-level tokenizer (260 ids) with a ChatML template, built offline: the GPU machine has no
    mistral-common, and the tiny test model has a 512-token vocabulary."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())  # one printable character per byte
    vocab = {"<unk>": 0, "<s>": 1, "<|im_end|>": 2, "<|im_start|>": 3, **{ch: i + 4 for i, ch in enumerate(alphabet)}}
    core = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
                                                  pre_tokenizers.Split("", behavior="isolated")])
    core.decoder = decoders.ByteLevel()
    tok = PreTrainedTokenizerFast(tokenizer_object=core, bos_token="<s>", eos_token="<|im_end|>", unk_token="<unk>")
    tok.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    tok.chat_template = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}"
                         "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")
    return tok


def chat(quantized: str | None, device: str) -> dict:
    """ChatSession through the Decoder vs through transformers' forward: same replies, consistent caches."""
    from mixtral_nb.chat import ChatSession

    d = quantized
    if d is None:
        d = tempfile.mkdtemp()
        write_tiny(d, seed=0)
    tok = _byte_tokenizer()
    model = build_model(device, None if quantized else QuantConfig(None, None), offload(3, 2, 4), d)
    replies = {}
    for engine in ("transformers", "decoder"):
        s = ChatSession(model, tok, system_prompt="sys", max_new_tokens=12, engine=engine)
        out = [s.send("Hello there"), s.send("And again"), s.regenerate()]
        consistent = s.cache_ids == s.encoded_history() and s.cache.length == len(s.cache_ids)
        replies[engine] = {"replies": out, "cache_consistent": consistent, "tok_s": s.last_stats["tok_s"],
                           "engine": s.engine}
        print(engine, replies[engine])
    same = replies["transformers"]["replies"] == replies["decoder"]["replies"]
    print(f"chat on {device}: replies identical on both engines: {same}")
    return {"same": same, **replies}


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("what", choices=("equivalence", "overlap", "split", "decoder", "chat"))
    p.add_argument("--device", default="cuda:0")
    p.add_argument("--quantized", default=None)
    p.add_argument("--json", default=None)
    a = p.parse_args(argv)
    res = {"equivalence": lambda: equivalence(a.quantized), "overlap": overlap, "split": split,
           "decoder": lambda: decoder(a.quantized), "chat": lambda: chat(a.quantized, a.device)}[a.what]()
    if a.json:
        with open(a.json, "w") as f:
            json.dump(res, f, indent=1, default=str)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
