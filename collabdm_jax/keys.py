"""Every random stream of a CollabDM run, derived from one shared root key.

Clients and server hold the same root key. Everything both sides must agree
on (the random network psi_t, the Siamese augmentation of class c at
iteration t) is a pure function of (root, t, c), so no network weights or
augmentation parameters are ever sent. Client-private randomness (which real
samples a client embeds, its local distillation) is folded in with the
client's id, so a client computes the same message alone in its own process
as it does inside a simulation of all clients.

The integers below name the streams; they are part of the protocol, so never
renumber them (a changed stream silently changes every message).
"""

import jax

_NETWORK = 0
_AUGMENT = 1
_CLIENT = 2
_SERVER = 3
_EVAL = 4
_LOCAL = 5


def network_key(root, t):
  """Key of the random embedding network psi_t of server iteration ``t``."""
  return jax.random.fold_in(jax.random.fold_in(root, _NETWORK), t)


def augment_key(root, t, c):
  """Siamese augmentation key shared by real and synthetic class ``c`` at ``t``."""
  return jax.random.fold_in(
      jax.random.fold_in(jax.random.fold_in(root, _AUGMENT), t), c)


def client_key(root, client_id):
  """Private stream of client ``client_id`` (minibatch choice, local DM)."""
  return jax.random.fold_in(jax.random.fold_in(root, _CLIENT), client_id)


def server_key(root):
  """Server-private stream (initialisation of the synthetic set)."""
  return jax.random.fold_in(root, _SERVER)


def eval_key(root):
  """Stream of the evaluation networks."""
  return jax.random.fold_in(root, _EVAL)


def local_distill_key(root, client_id):
  """Private stream of client ``client_id``'s local distillation."""
  return jax.random.fold_in(jax.random.fold_in(root, _LOCAL), client_id)
