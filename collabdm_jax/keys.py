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


# Differential privacy (collabdm_jax/privacy.py): streams of a client-SECRET
# seed, never of the shared root. The server holds the root key, so sampling
# or noise folded from it could be replayed and the noise subtracted.
_DP_SAMPLE = 0
_DP_NOISE = 1


def dp_client_key(secret_seed: int, client_id):
  """Client ``client_id``'s private DP stream from the clients' secret seed."""
  return jax.random.fold_in(jax.random.key(secret_seed), client_id)


def dp_sample_key(dp_key):
  """Which examples each iteration's Poisson sample draws."""
  return jax.random.fold_in(dp_key, _DP_SAMPLE)


def dp_noise_key(dp_key):
  """The Gaussian noise added to each released sum."""
  return jax.random.fold_in(dp_key, _DP_NOISE)
