"""A short README.md for every published checkpoint: what it is, how it was made, how good it is."""

from __future__ import annotations

from typing import Any

# The transformers class a trained family's checkpoint loads as.
MODEL_CLASSES = {
    "vision-encoder-decoder": "VisionEncoderDecoderModel",
    "git": "GitForCausalLM",
    "blip": "BlipForConditionalGeneration",
}


def _pct(value: Any) -> str:
    return f"{value:.1%}" if isinstance(value, int | float) else "n/a"


def _num(value: Any) -> str:
    return f"{value:.3f}" if isinstance(value, int | float) else "n/a"


def model_card(info: dict[str, Any]) -> str:
    training = info.get("training", {})
    scores = info.get("scores", {})
    data = info.get("data", {})
    decoding = scores.get("decoding", {})
    parent = info.get("parent")
    size_mb = info.get("size_bytes", 0) / 1e6
    family = str(info.get("family") or "vision-encoder-decoder")
    if training.get("init_from"):
        architecture = f"fine-tuned from `{training['init_from']}`"
    else:
        git = family == "git"
        encoder, decoder = ("CLIP-style image encoder", "GIT text decoder") if git else ("ViT encoder", "GPT-2 decoder")
        architecture = (
            f"{encoder} ({training.get('vit_layers')} layers, hidden {training.get('vit_hidden')}, "
            f"{training.get('image_size')} px input, {training.get('patch_size')} px patches) + {decoder} "
            f"({training.get('gpt2_layers')} layers, hidden {training.get('gpt2_hidden')}), "
            "byte-level BPE tokenizer trained on the captions; built from scratch"
        )
    lines = [
        f"# {info.get('name', 'model')} ({info.get('version', '?')})",
        "",
        f"A Hugging Face `{MODEL_CLASSES.get(family, family)}` checkpoint (family `{family}`) made by the "
        "captionfleet trainer; the captionfleet worker loads it as it is.",
        "",
        f"- **Model**: {architecture}; {info.get('parameters', 0) / 1e6:.2f}M parameters, {size_mb:.1f} MB.",
        f"- **Parent**: {parent['ref'] if parent else 'none (trained from scratch)'}",
        f"- **Command**: `{info.get('command') or '(not recorded)'}`",
        f"- **Training**: {info.get('steps')} steps of {training.get('batch_size')} x "
        f"{training.get('grad_accum')} samples, AdamW lr {training.get('learning_rate')} (warm-up + cosine), "
        f"seed {training.get('seed')}, {info.get('train_seconds')} s on {info.get('host', {}).get('device')}.",
        f"- **Data**: {_describe_data(data)}",
        "",
        f"## Scores on {scores.get('images', 0)} validation images (never trained on)",
        "",
        f"Decoding: {decoding.get('num_beams', '?')} beams, at most {decoding.get('max_new_tokens', '?')} "
        "new tokens (the worker's defaults unless the command says otherwise).",
        "",
        "| exact match | BLEU-4 | CIDEr-D | repetition rate |",
        "|---|---|---|---|",
        f"| {_pct(scores.get('exact_match'))} | {_num(scores.get('bleu4'))} | {_num(scores.get('cider'))} "
        f"| {_pct(scores.get('repetition_rate'))} |",
        "",
        "Samples (caption, then the truth):",
        "",
    ]
    for sample in scores.get("samples", []):
        lines.append(f"- {sample[0]!r} / {sample[1]!r}")
    lines += ["", "Full settings, data description and scores: `captionfleet.json`.", ""]
    return "\n".join(lines)


def _describe_data(data: dict[str, Any]) -> str:
    train, val = data.get("train", {}), data.get("val", {})
    if train.get("kind") == "shapes":
        return (
            f"synthetic shapes (trainer/shapes.py): one to three shapes of 5 kinds, 6 colours, 2 sizes, "
            f"with spatial relations; training pictures from seed {train.get('seed')} (rendered on demand), "
            f"validation from seed {val.get('seed')} ({val.get('length')} pictures)."
        )
    skipped = data.get("skipped", {}).get("total", 0)
    return (
        f"{train.get('source')}: {train.get('images')} training and {val.get('images')} validation images "
        f"({skipped} skipped)."
    )
