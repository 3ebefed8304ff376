"""SSA demo: a short LoRA fine-tune of SmolLM2 with the SSA loss on the CPU (JSON lines).

Data: needle-in-a-haystack items (core ``niah`` generator, short lengths) as chat prompts
with the needle's value as the answer; CE on the answer tokens, SSA alignment on every layer.
Before and after training, in the same run and on held-out items:

- attention sparsity (share of full attention mass inside the blocks SSA's selector keeps);
- niah accuracy with sparse inference (``ssa`` attention backend) and with dense attention.

    uv run --no-sync python benchmarks/attention_ssa.py --steps 200   # needs peft (extra "ssa")
"""

from __future__ import annotations

import argparse
import json
import time

import torch
from apportion.base import Prompt
from apportion.baselines.niah import NeedleConfig, SingleNeedle
from apportion.host import Host, load_model
from apportion.host.attention import AttentionBackend
from apportion_attention.ssa import SSAAttention, SSAConfig, SSALoss, attention_sparsity


def items(tok, lengths, n, seed):
    bench = SingleNeedle(
        NeedleConfig(lengths=lengths, depths=[0.2, 0.5, 0.8], samples=max(1, n // 3 + 1), seed=seed)
    )
    return list(bench.samples(tok))[:n]


def encode_train(host: Host, sample) -> tuple[torch.Tensor, torch.Tensor]:
    enc = host.encode(
        Prompt(
            [{"role": "user", "content": f"{sample.context}\n\n{sample.question}"}],
            question=sample.question,
        )
    )
    answer = host.tokenizer.encode(f"{sample.answers[0]}<|im_end|>", add_special_tokens=False)
    ids = torch.tensor([enc.ids + answer])
    labels = torch.full_like(ids, -100)
    labels[0, len(enc.ids) :] = ids[0, len(enc.ids) :]
    return ids, labels


def evaluate(loaded, cfg: SSAConfig, samples, new_tokens: int) -> dict:
    out = {}
    for name, backend in (("sparse", SSAAttention(cfg)), ("dense", AttentionBackend())):
        host = Host(loaded, backend)
        ok = 0
        for s in samples:
            text = host.generate(
                Prompt(
                    [{"role": "user", "content": f"{s.context}\n\n{s.question}"}],
                    question=s.question,
                ),
                max_new_tokens=new_tokens,
            )[0].text
            ok += s.answers[0] in text.replace(",", "")
        out[f"niah_{name}_accuracy"] = ok / len(samples)
    ids = [Host(loaded).encode(f"{s.context}\n\n{s.question}").ids for s in samples[:3]]
    out["attention_sparsity"] = sum(
        attention_sparsity(loaded.model, torch.tensor([i]), cfg) for i in ids
    ) / len(ids)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--train-length", type=int, default=256)
    ap.add_argument("--eval-length", type=int, default=768)
    ap.add_argument("--eval-samples", type=int, default=9)
    ap.add_argument("--lr", type=float, default=2e-4)
    ap.add_argument("--block-size", type=int, default=16)
    ap.add_argument("--top-blocks", type=int, default=4)
    ap.add_argument("--new-tokens", type=int, default=24)
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument(
        "--align-weight",
        type=float,
        default=SSAConfig().align_weight,
        help="0 with --sparse-prob 0: the control (plain CE fine-tune, full attention)",
    )
    ap.add_argument("--sparse-prob", type=float, default=SSAConfig().sparse_prob)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    from peft import LoraConfig, get_peft_model

    loaded = load_model("smollm2")
    tok = loaded.tokenizer
    cfg = SSAConfig(
        block_size=args.block_size,
        top_blocks=args.top_blocks,
        align_weight=args.align_weight,
        sparse_prob=args.sparse_prob,
    )
    held_out = items(tok, [args.eval_length], args.eval_samples, seed=1000)
    t0 = time.perf_counter()
    before = evaluate(loaded, cfg, held_out, args.new_tokens)
    print(
        json.dumps({"phase": "before", **before, "seconds": time.perf_counter() - t0}), flush=True
    )

    peft_model = get_peft_model(
        loaded.model,
        LoraConfig(
            r=8,
            lora_alpha=16,
            lora_dropout=0.0,
            target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
        ),
    )
    peft_model.train()
    opt = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=args.lr)
    loss_fn = SSALoss(cfg, seed=0)
    train = items(tok, [args.train_length], args.steps, seed=7)
    host = Host(loaded)
    t1 = time.perf_counter()
    for step in range(args.steps):
        ids, labels = encode_train(host, train[step % len(train)])
        loss = loss_fn(peft_model, ids, labels)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % 10 == 0 or step == args.steps - 1:
            print(
                json.dumps(
                    {
                        "phase": "train",
                        "step": step,
                        "loss": float(loss),
                        **loss.components,
                        "seconds": time.perf_counter() - t1,
                    }
                ),
                flush=True,
            )
    peft_model.eval()
    after = evaluate(loaded, cfg, held_out, args.new_tokens)
    print(json.dumps({"phase": "after", **after}), flush=True)
    print(
        json.dumps(
            {
                "summary": True,
                "benchmark": "attention_ssa",
                "steps": args.steps,
                "train_length": args.train_length,
                "eval_length": args.eval_length,
                "eval_samples": len(held_out),
                "block_size": cfg.block_size,
                "top_blocks": cfg.top_blocks,
                "align_weight": cfg.align_weight,
                "sparse_prob": cfg.sparse_prob,
                "train_seconds": time.perf_counter() - t1,
                "sparsity_before": before["attention_sparsity"],
                "sparsity_after": after["attention_sparsity"],
                "niah_sparse_before": before["niah_sparse_accuracy"],
                "niah_sparse_after": after["niah_sparse_accuracy"],
                "niah_dense_before": before["niah_dense_accuracy"],
                "niah_dense_after": after["niah_dense_accuracy"],
                "targets": {"sparsity": "after > before", "niah_sparse": "after > before"},
                "met": {
                    "sparsity": after["attention_sparsity"] > before["attention_sparsity"],
                    "niah_sparse": after["niah_sparse_accuracy"] > before["niah_sparse_accuracy"],
                },
            }
        ),
        flush=True,
    )


if __name__ == "__main__":
    main()
