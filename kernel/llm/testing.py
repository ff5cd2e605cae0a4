"""Tiny random models for tests and benchmarks: Llama, Mixtral and Jamba configs (hidden 64, vocab ~1000)
with a BPE tokenizer trained offline on the fly, saved as ordinary local model folders (safetensors +
tokenizer + chat template), so they go through the same loading code as real checkpoints."""
from __future__ import annotations

from pathlib import Path

CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
_WORDS = ("the agent kernel model token memory storage schedule batch cache tool file paris france capital "
          "what is of a an to and in on for with answer question hello world one two three four five six "
          "seven eight nine ten red green blue fast slow small large read write plan search list run stop").split()


def build_tokenizer(out: Path, vocab_size: int = 1000):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<unk>", "<|im_start|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    corpus = [" ".join(_WORDS[(i * 7 + j * 3) % len(_WORDS)] for j in range(12)) + "." for i in range(400)]
    tok.train_from_iterator(corpus, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", eos_token="<|im_end|>",
                                   bos_token="<|im_start|>", pad_token="<unk>")
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(out)
    return fast


def tiny_config(arch: str, vocab_size: int, head_dim: int | None = None):
    from transformers import JambaConfig, LlamaConfig, MixtralConfig

    common = dict(vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=2048, eos_token_id=2, bos_token_id=1,
                  pad_token_id=0, tie_word_embeddings=False)
    if head_dim is not None:            # vLLM's CPU attention takes head sizes of 32 and up, not 16
        common["head_dim"] = head_dim
    if arch == "llama":
        return LlamaConfig(num_hidden_layers=2, **common)
    if arch == "mixtral":
        return MixtralConfig(num_hidden_layers=2, num_local_experts=4, num_experts_per_tok=2, **common)
    if arch == "jamba":
        return JambaConfig(num_hidden_layers=4, attn_layer_period=2, attn_layer_offset=1, expert_layer_period=2,
                           expert_layer_offset=1, num_experts=4, num_experts_per_tok=2, mamba_d_state=8,
                           mamba_d_conv=4, mamba_expand=2, **common)
    raise ValueError(f"unknown tiny architecture {arch!r}; known: llama, mixtral, jamba")


def build_tiny_model(out: str | Path, arch: str = "llama", seed: int = 0, head_dim: int | None = None) -> Path:
    """Write a tiny random model of `arch` with its tokenizer to `out`; return the folder."""
    import torch
    from transformers import AutoModelForCausalLM

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    tok = build_tokenizer(out)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(arch, len(tok), head_dim))
    # A random model rarely emits EOS by chance; keep generations a predictable length in tests.
    model.generation_config.eos_token_id = tok.eos_token_id
    model.save_pretrained(out)
    return out


PASSKEY_TASK = ("There is an important info hidden inside a lot of irrelevant text. Find it and memorize them. "
                "I will quiz you about the important information there.\n")
PASSKEY_FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again.\n"
PASSKEY_QUESTION = "What is the pass key? The pass key is"


def passkey_prompt(tokenizer, n_tokens: int, depth: float, key: int) -> str:
    """LongLLaMA's passkey-retrieval prompt (the FoT paper's): the task, filler text about `n_tokens` long with
    "The pass key is KEY" at `depth` (0: first, 1: last) of it, then the question the model completes."""
    needle = f"The pass key is {key}. Remember it. {key} is the pass key.\n"
    fixed = len(tokenizer.encode(PASSKEY_TASK + needle + PASSKEY_QUESTION))
    per = len(tokenizer.encode(PASSKEY_FILLER * 8)) / 8
    fillers = max(1, round((n_tokens - fixed) / per))
    at = round(fillers * depth)
    return PASSKEY_TASK + PASSKEY_FILLER * at + needle + PASSKEY_FILLER * (fillers - at) + PASSKEY_QUESTION
