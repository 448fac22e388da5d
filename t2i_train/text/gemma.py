"""Frozen Gemma-2 text encoder with the reference's prompt formatting and token selection.

What the T2I reference does, reproduced here (configs `text_encoder:` section, train.py, inference.py):
* the "complex human instruction" (CHI) lines joined by newlines are prepended to every caption;
* tokenise right-padded to `n_chi + L − 2` tokens (n_chi = token count of the instruction incl. <bos>;
  the 2 are <bos> and the instruction's trailing separator), truncating longer captions;
* run the decoder stack (last hidden state, i.e. after Gemma's final RMSNorm) and keep token 0 (<bos>) plus
  the last L − 1 positions, with the same selection applied to the attention mask (L = 300);
* the null / negative condition is the plain prompt ("" by default) WITHOUT the instruction, padded to L.
The embeddings get no further normalisation here: the reference's `y_norm` lives in the denoiser's caption
embedder (an RMSNorm after the projection), which is the model's business.
"""
from __future__ import annotations

from typing import Sequence

import torch

CHI_PROMPT = "\n".join([
    'Given a user prompt, generate an "Enhanced prompt" that provides detailed visual descriptions suitable for '
    'image generation. Evaluate the level of detail in the user prompt:',
    "- If the prompt is simple, focus on adding specifics about colors, shapes, sizes, textures, and spatial "
    "relationships to create vivid and concrete scenes.",
    "- If the prompt is already detailed, refine and enhance the existing details slightly without overcomplicating.",
    "Here are examples of how to transform or refine prompts:",
    "- User Prompt: A cat sleeping -> Enhanced: A small, fluffy white cat curled up in a round shape, sleeping "
    "peacefully on a warm sunny windowsill, surrounded by pots of blooming red flowers.",
    "- User Prompt: A busy city street -> Enhanced: A bustling city street scene at dusk, featuring glowing street "
    "lamps, a diverse crowd of people in colorful clothing, and a double-decker bus passing by towering glass "
    "skyscrapers.",
    "Please generate only the enhanced description for the prompt below and avoid including any additional "
    "commentary or evaluations:",
    "User Prompt: ",
])

DEFAULT_GEMMA = "google/gemma-2-2b-it"


class GemmaTextEncoder:
    """`encode(prompts) -> (emb [B, L, D] float32, mask [B, L] long)`; `encode_null(prompt="")` → [1, L, D], [1, L]."""

    def __init__(self, path: str = DEFAULT_GEMMA, *, max_length: int = 300, chi_prompt: str | None = CHI_PROMPT,
                 dtype: torch.dtype = torch.bfloat16, device: torch.device | str = "cpu", batch_size: int = 32,
                 tokenizer=None, model=None):
        from transformers import AutoModel, AutoTokenizer

        self.path = str(path)
        self.max_length = int(max_length)
        self.chi_prompt = chi_prompt or None
        self.batch_size = int(batch_size)
        self.device = torch.device(device)
        self.tokenizer = tokenizer if tokenizer is not None else AutoTokenizer.from_pretrained(self.path)
        self.tokenizer.padding_side = "right"
        if model is None:
            model = AutoModel.from_pretrained(self.path, dtype=dtype)
        if hasattr(model, "get_decoder") and not hasattr(model, "embed_tokens"):
            model = model.get_decoder()  # a *ForCausalLM: keep the decoder stack, as the reference
        self.model = model.to(device=self.device, dtype=dtype).eval().requires_grad_(False)
        self.dim = int(self.model.config.hidden_size)
        self.n_chi = len(self.tokenizer.encode(self.chi_prompt)) if self.chi_prompt else 0
        # positions kept from the tokenised sequence: <bos> and the last L − 1
        self.select = [0] + list(range(-self.max_length + 1, 0))

    @torch.no_grad()
    def _hidden(self, texts: list[str], length: int) -> tuple[torch.Tensor, torch.Tensor]:
        tok = self.tokenizer(texts, padding="max_length", max_length=length, truncation=True, return_tensors="pt")
        ids, attn = tok.input_ids.to(self.device), tok.attention_mask.to(self.device)
        hidden = self.model(input_ids=ids, attention_mask=attn)[0]
        return hidden, attn

    @torch.no_grad()
    def encode(self, prompts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        prompts = [str(p) for p in prompts]
        if self.chi_prompt:
            texts, length = [self.chi_prompt + p for p in prompts], self.n_chi + self.max_length - 2
        else:
            texts, length = prompts, self.max_length
        embs, masks = [], []
        for i in range(0, len(texts), self.batch_size):
            hidden, attn = self._hidden(texts[i:i + self.batch_size], length)
            embs.append(hidden[:, self.select].float())
            masks.append(attn[:, self.select].long())
        if not embs:
            return torch.zeros(0, self.max_length, self.dim), torch.zeros(0, self.max_length, dtype=torch.long)
        return torch.cat(embs), torch.cat(masks)

    @torch.no_grad()
    def encode_null(self, prompt: str = "") -> tuple[torch.Tensor, torch.Tensor]:
        """The unconditional (or negative-prompt) condition: the plain prompt, no instruction, padded to L."""
        hidden, attn = self._hidden([prompt], self.max_length)
        return hidden.float(), attn.long()
