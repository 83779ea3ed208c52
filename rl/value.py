"""A learned value baseline: any model family plus a scalar head on its final hidden state.

``WithValueHead(base)`` applies ``base`` (llama, recursive, mor: anything whose last
hidden state goes through a norm named ``final_norm`` before the LM head) unchanged
and reads that normalised hidden state with ``nn.intercept_methods``: a trace-time hook, so
it works under ``jax.jit``, with or without a KV cache, and needs no change to the
families. A ``Dense(1)`` on it gives ``values`` [B, T]: the value of the state at each
position, before its target token is chosen (the position whose logits pick that token).

The families call ``final_norm`` on the last hidden state first; the recursive family's
early exits (training with targets, or ``return_exits``) call it again afterwards on the
earlier loops' states, so the *first* call is the one kept.

Parameters: ``{'base': <the family's params>, 'value_head': {'kernel', 'bias'}}``
(``wrap_params``); other collections (MoR's ``router_state``) nest under ``base`` too.
"""
import flax.linen as nn
import jax.numpy as jnp


class WithValueHead(nn.Module):
  """``apply(variables, tokens, **kwargs) -> (logits, aux)`` as ``base``, plus
  ``aux['values']`` [B, T] float32. The value head's gradient reaches the shared trunk."""
  base: nn.Module

  def init_cache(self, batch, max_len):
    return self.base.init_cache(batch, max_len)

  @nn.compact
  def __call__(self, tokens, **kwargs):
    captured = []

    def grab_final_hidden(next_fn, args, fn_kwargs, context):
      out = next_fn(*args, **fn_kwargs)
      if (context.method_name == '__call__' and context.module.name == 'final_norm'
          and not captured):
        captured.append(out)
      return out

    with nn.intercept_methods(grab_final_hidden):
      logits, aux = self.base(tokens, **kwargs)
    if not captured:
      raise ValueError(f'WithValueHead: {type(self.base).__name__} has no submodule named '
                       "'final_norm' to read the final hidden state from.")
    head = nn.Dense(1, dtype=jnp.float32, param_dtype=jnp.float32,
                    kernel_init=nn.with_logical_partitioning(nn.initializers.zeros_init(),
                                                             ('embed', None)),
                    name='value_head')
    values = head(captured[0].astype(jnp.float32))[..., 0]
    return logits, {**aux, 'values': values}


def wrap_params(base_params, value_params):
  """The ``WithValueHead`` parameter tree from a family's params and the head's params."""
  return {'base': base_params, 'value_head': value_params}
