"""Expert-parallel dropless MoE: tokens stay on their data shard, assignments travel to the experts.

Under `jax.shard_map` over the whole mesh, each device holds n local tokens (the batch is split over
data x fsdp x expert, see sharding.RULES["batch"]) and the e = E / ep experts of its `expert`
coordinate (inner dim over `tensor`). Per device:
  1. sort the n*K local token-expert assignments by expert (so by destination device);
  2. dispatch: slice i of the sorted rows (global expert i) goes to device i // e, which places it
     straight at its expert-sorted position (one slice per (source, local expert));
  3. grouped matmul over the received rows (group sizes: rows per local expert);
  4. the reverse exchange back to the sender, unsort, combine with the gate weights;
  5. psum over `tensor` (the down projection's partial sums over the inner dim).
The router's top-k runs per batch shard too (`route_local`); aux["load"] stays the global-batch sum
(a GSPMD all-reduce of [E] counts).

Exchange (`cfg.moe.all_to_all`):
  ragged  `jax.lax.ragged_all_to_all`: sends only the rows routed (n*K per device) into a
          receive buffer sized for the worst case. TPU and GPU.
  dense   the same semantics through `jax.lax.all_to_all` of fixed chunks of n*min(K, e) rows per
          peer (the worst case), ep times the rows sent. The fallback where XLA has no
          ragged-all-to-all: XLA:CPU in jax 0.10.2 ("UNIMPLEMENTED: HLO opcode ragged-all-to-all").
  None    ragged, except dense on CPU (logged once).
Receive buffer per device: ep * n * min(K, e) rows (every peer's tokens could all choose experts
here; each token's K experts are distinct, so at most min(K, e) of them land on one device).
"""
from __future__ import annotations

import functools
import logging

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from mixtral_jax.model.moe import grouped_matmul
from mixtral_jax.sharding import batch_shards, logical_to_spec, mesh_platform

log = logging.getLogger(__name__)

ALL_TO_ALLS = ("ragged", "dense", None)
_LOGGED: set = set()


def _log_once(level, msg, *args):
  key = (level, msg, args)
  if key not in _LOGGED:
    _LOGGED.add(key)
    log.log(level, msg, *args)


def resolve_all_to_all(requested: str | None, platform: str | None) -> str:
  """The exchange for `platform` (mesh devices' platform; None: jax.default_backend())."""
  if requested not in ALL_TO_ALLS:
    raise ValueError(f"moe.all_to_all: unknown {requested!r}; expected one of {ALL_TO_ALLS}")
  platform = platform or jax.default_backend()
  if platform == "cpu":
    if requested == "ragged":
      _log_once(logging.WARNING, "moe_ep: all_to_all='ragged' requested but XLA:CPU has no "
                "ragged-all-to-all; using dense all_to_all into a worst-case buffer")
    else:
      _log_once(logging.INFO, "moe_ep: expert dispatch on cpu through dense all_to_all "
                "(worst-case chunks; XLA:CPU has no ragged-all-to-all)")
    return "dense"
  impl = requested or "ragged"
  _log_once(logging.INFO, "moe_ep: expert dispatch on %s through %s all_to_all", platform, impl)
  return impl


def dense_ragged_all_to_all(operand, output, input_offsets, send_sizes, output_offsets, recv_sizes,
                            *, axis_name: str, chunk: int):
  """`jax.lax.ragged_all_to_all`'s semantics (see its docstring) with one dense all_to_all.

  Each peer's slices are packed into a chunk of `chunk` rows (>= the rows sent to any one peer),
  exchanged as [P, chunk, D], and written at the receiver-side offsets. Rows of `output` that no
  slice writes keep their value.
  """
  peers = jax.lax.axis_size(axis_name)
  spd = input_offsets.shape[0] // peers                 # slices per peer
  d = operand.shape[1]
  p_C = jnp.arange(chunk)

  def locate(sizes_PS):
    """For each (peer, chunk row): its slice within the peer's group, offset in it, validity."""
    ends_PS = jnp.cumsum(sizes_PS, axis=1)
    q_PC = jax.vmap(lambda e: jnp.searchsorted(e, p_C, side="right"))(ends_PS)
    q_PC = jnp.minimum(q_PC, spd - 1)
    start_PC = jnp.take_along_axis(ends_PS - sizes_PS, q_PC, axis=1)
    valid_PC = p_C[None, :] < ends_PS[:, -1:]
    return q_PC, p_C[None, :] - start_PC, valid_PC

  q, o, valid = locate(send_sizes.reshape(peers, spd))
  src_PC = jnp.take_along_axis(input_offsets.reshape(peers, spd), q, axis=1) + o
  send_PCD = jnp.where(valid[..., None], operand[jnp.where(valid, src_PC, 0)], 0).astype(output.dtype)
  recv_PCD = jax.lax.all_to_all(send_PCD, axis_name, 0, 0, tiled=True)
  recv_off = jax.lax.all_to_all(output_offsets, axis_name, 0, 0, tiled=True)  # receiver side
  q, o, valid = locate(recv_sizes.reshape(peers, spd))
  dst_PC = jnp.take_along_axis(recv_off.reshape(peers, spd), q, axis=1) + o
  dst_PC = jnp.where(valid, dst_PC, output.shape[0])    # out of range: dropped
  return output.at[dst_PC.reshape(-1)].set(recv_PCD.reshape(-1, d), mode="drop")


def _exchange(impl, chunk, axis_name):
  if impl == "ragged":
    return functools.partial(jax.lax.ragged_all_to_all, axis_name=axis_name)
  return functools.partial(dense_ragged_all_to_all, axis_name=axis_name, chunk=chunk)


def ep_experts_local(x_nD, idx_nK, w_nK, gate_eDF, up_eDF, down_eFD, *, act, impl: str,
                     gmm_impl: str | None, expert_axis: str = "expert", tensor_axis: str = "tensor"):
  """Per-device body (inside shard_map). x_nD: this device's tokens; idx_nK int32 global expert ids
  (distinct per row); w_nK f32 gate weights; weights: this device's e experts (F over tensor).
  Returns y_nD float32 = sum_k w_nk * expert_{idx_nk}(x_n), summed over `tensor`."""
  n, k = idx_nK.shape
  e = gate_eDF.shape[0]
  ep = jax.lax.axis_size(expert_axis)
  num_e = ep * e
  chunk = n * min(k, e)                                  # most rows one peer can send me
  exchange = _exchange(impl, chunk, expert_axis)

  flat_m = idx_nK.reshape(-1)                            # m = n*K assignments, token-major
  order_m = jnp.argsort(flat_m, stable=True)             # by global expert = by destination
  send_E = jnp.bincount(flat_m, length=num_e).astype(jnp.int32)
  in_off_E = jnp.cumsum(send_E) - send_E
  xs_mD = x_nD[order_m // k]
  # recv_E[s * e + j]: rows peer s sends to my local expert j.
  recv_E = jax.lax.all_to_all(send_E, expert_axis, 0, 0, tiled=True)
  recv_SE = recv_E.reshape(ep, e)
  rows_e = jnp.sum(recv_SE, axis=0)                      # my experts' group sizes
  # Expert-sorted receive buffer: expert j's rows from peer 0, then peer 1, ...
  dst_SE = (jnp.cumsum(rows_e) - rows_e)[None, :] + jnp.cumsum(recv_SE, axis=0) - recv_SE
  dst_E = dst_SE.reshape(-1)
  out_off_E = jax.lax.all_to_all(dst_E, expert_axis, 0, 0, tiled=True)  # where my slices land
  buf_rows = ep * chunk
  xr_MD = exchange(xs_mD, jnp.zeros((buf_rows, x_nD.shape[1]), x_nD.dtype), in_off_E, send_E,
                   out_off_E, recv_E)

  gmm = functools.partial(grouped_matmul, group_sizes_E=rows_e, impl=gmm_impl)
  yr_MD = gmm(act(gmm(xr_MD, gate_eDF), gmm(xr_MD, up_eDF)), down_eFD)

  # Reverse: slice s*e+j goes back to peer s, at that peer's sorted offset of its slice me*e+j.
  back_off_E = jax.lax.all_to_all(in_off_E, expert_axis, 0, 0, tiled=True)
  ys_mD = exchange(yr_MD, jnp.zeros((n * k, yr_MD.shape[1]), yr_MD.dtype), dst_E, recv_E,
                   back_off_E, send_E)
  y_mD = jnp.zeros_like(ys_mD).at[order_m].set(ys_mD)   # unsort: row m is assignment m again
  y_nD = jnp.einsum("NKD,NK->ND", y_mD.reshape(n, k, -1).astype(jnp.float32), w_nK)
  return jax.lax.psum(y_nD, tensor_axis) if tensor_axis else y_nD


def route_local(gate, x_ND):
  """`gate(x_ND)` (router.Router) with the top-k inside shard_map on each batch shard: under
  GSPMD, XLA gathers the global [N, E] scores in front of its TopK. Same outputs as gate(x_ND)."""
  from mixtral_jax.model import router as router_lib  # late: router imports sharding only
  logits_NE = gate.logits(x_ND)
  tok = P(logical_to_spec(("batch",))[0], None)
  route = functools.partial(router_lib.route, kind=gate.kind, top_k=gate.top_k,
                            normalize_topk=gate.normalize_topk,
                            routed_scaling_factor=gate.routed_scaling_factor)
  mesh = jax.sharding.get_abstract_mesh()
  if gate.e_score_correction_bias is None:
    local = jax.jit(jax.shard_map(route, mesh=mesh, in_specs=(tok,), out_specs=(tok,) * 3,
                                  check_vma=False))
    idx_NK, w_NK, scores_NE = local(logits_NE)
  else:
    local = jax.jit(jax.shard_map(lambda l, b: route(l, bias_E=b), mesh=mesh,
                                  in_specs=(tok, P()), out_specs=(tok,) * 3, check_vma=False))
    idx_NK, w_NK, scores_NE = local(logits_NE, gate.e_score_correction_bias[...])
  return idx_NK, w_NK, logits_NE, scores_NE


@functools.lru_cache(maxsize=64)
def _ep_program(mesh, tok, w_in, w_out, act, impl, gmm_impl, tensor_axis):
  """The jitted shard_map of `ep_experts_local`, one per (mesh, specs, activation, exchange, matmul): called eagerly (model(tokens) outside any jit), a bare shard_map runs its body primitive
  by primitive, one compile each (~2000 for a 4-layer model, 90 s on CPU); jitted it is one compile,
  and a cached program is not recompiled on the next eager call. Inside a jitted step it is inlined."""
  body = functools.partial(ep_experts_local, act=act, impl=impl, gmm_impl=gmm_impl,
                           tensor_axis=tensor_axis)
  return jax.jit(jax.shard_map(body, mesh=mesh, in_specs=(tok, tok, tok, w_in, w_in, w_out),
                               out_specs=tok, check_vma=False))


def ep_experts(x_ND, idx_NK, w_NK, gate_EDF, up_EDF, down_EFD, *, act, all_to_all=None,
               gmm_impl=None):
  """Expert-parallel `moe.dropless_experts` on the current mesh (jax.set_mesh). Global arrays in,
  y_ND float32 out, split like the batch. N must divide by the batch's mesh split and E by the
  `expert` axis."""
  mesh = jax.sharding.get_abstract_mesh()
  batch = logical_to_spec(("batch",))[0]
  shards = batch_shards(mesh)
  if x_ND.shape[0] % shards:
    raise ValueError(f"moe_ep: {x_ND.shape[0]} tokens do not split over the batch axes {batch} "
                     f"({shards} shards)")
  if gate_EDF.shape[0] % mesh.shape["expert"]:
    raise ValueError(f"moe.num_experts: {gate_EDF.shape[0]} experts do not split over "
                     f"expert={mesh.shape['expert']} devices")
  impl = resolve_all_to_all(all_to_all, mesh_platform())
  local = _ep_program(mesh, P(batch, None),
                      logical_to_spec(("expert", None, "expert_mlp")),  # FSDP dim gathered here
                      logical_to_spec(("expert", "expert_mlp", None)), act, impl, gmm_impl,
                      "tensor" if mesh.shape.get("tensor", 1) > 1 else None)
  return local(x_ND, idx_NK, w_NK, gate_EDF, up_EDF, down_EFD)
