"""A stand-in for InternLM2's remote modeling code, written for the tests (the real one is not here: no network).

It has InternLM2's module names and grouped ``wqkv`` layout (per kv head: the group's q heads, then k, then v)
and Llama's math otherwise, and is loaded the way remote code is: ``auto_map`` + ``trust_remote_code``."""

import torch
from torch import nn
from transformers import PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast

from .configuration_standin import StandInInternLM2Config


class RMSNorm(nn.Module):
    def __init__(self, size, eps):
        super().__init__()
        self.weight, self.eps = nn.Parameter(torch.ones(size)), eps

    def forward(self, x):
        return self.weight * x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)


def rope(x, pos, theta):
    d = x.shape[-1]
    freq = pos[..., None].float() / theta ** (torch.arange(0, d, 2, device=x.device).float() / d)
    cos, sin = torch.cat([freq.cos()] * 2, -1)[:, None], torch.cat([freq.sin()] * 2, -1)[:, None]
    return x * cos + torch.cat([-x[..., d // 2:], x[..., :d // 2]], -1) * sin


class Attention(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.h, self.kv, self.theta = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.rope_theta
        self.d = cfg.hidden_size // cfg.num_attention_heads
        self.wqkv = nn.Linear(cfg.hidden_size, (self.h + 2 * self.kv) * self.d, bias=False)
        self.wo = nn.Linear(self.h * self.d, cfg.hidden_size, bias=False)

    def forward(self, hidden_states, position_ids=None, **kwargs):
        b, s, _ = hidden_states.shape
        qkv = self.wqkv(hidden_states).view(b, s, self.kv, self.h // self.kv + 2, self.d)
        q = qkv[:, :, :, :-2].reshape(b, s, self.h, self.d).transpose(1, 2)
        k = qkv[:, :, :, -2].transpose(1, 2).repeat_interleave(self.h // self.kv, 1)
        v = qkv[:, :, :, -1].transpose(1, 2).repeat_interleave(self.h // self.kv, 1)
        pos = position_ids if position_ids is not None else torch.arange(s, device=hidden_states.device)[None]
        q, k = rope(q, pos, self.theta), rope(k, pos, self.theta)
        out = nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.wo(out.transpose(1, 2).reshape(b, s, -1))


class FeedForward(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.w1 = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.w3 = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.w2 = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x):
        return self.w2(nn.functional.silu(self.w1(x)) * self.w3(x))


class DecoderLayer(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.attention_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.ffn_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.attention, self.feed_forward = Attention(cfg), FeedForward(cfg)

    def forward(self, hidden_states, position_ids=None, **kwargs):
        h = hidden_states + self.attention(self.attention_norm(hidden_states), position_ids=position_ids)
        return (h + self.feed_forward(self.ffn_norm(h)),)


class StandInPreTrained(PreTrainedModel):
    config_class = StandInInternLM2Config
    base_model_prefix = "model"

    def _init_weights(self, module):
        if isinstance(module, (nn.Linear, nn.Embedding)):
            module.weight.data.normal_(0, 0.02)


class StandInModel(StandInPreTrained):
    def __init__(self, cfg):
        super().__init__(cfg)
        self.tok_embeddings = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg) for _ in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_init()

    def forward(self, input_ids, **kwargs):
        h = self.tok_embeddings(input_ids)
        pos = torch.arange(input_ids.shape[1], device=input_ids.device)[None]
        for layer in self.layers:
            h = layer(h, position_ids=pos)[0]
        return self.norm(h)


class StandInInternLM2ForCausalLM(StandInPreTrained):
    def __init__(self, cfg):
        super().__init__(cfg)
        self.model = StandInModel(cfg)
        self.output = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.post_init()

    def forward(self, input_ids=None, **kwargs):
        return CausalLMOutputWithPast(logits=self.output(self.model(input_ids)))
