"""Ed25519 key pairs for signed client uploads.

  python -m launch.keygen --client_ids=0-9 --out_dir=/secure/keys

Writes ``client_NNNNN.key`` (private, mode 0600: give each client its own)
and ``client_NNNNN.pub`` (public: the server's ``--public_key_dir``). Never
overwrites an existing key. Then:

  python -m launch.client ... --client_id=3 --signing_key=/secure/keys/client_00003.key
  python -m launch.server ... --public_key_dir=/server/pubkeys
"""

from absl import app
from absl import flags

from collabdm_jax import signing

_IDS = flags.DEFINE_string("client_ids", None,
                           "Client ids: comma-separated ids and ranges a-b "
                           "(inclusive), e.g. 0-9 or 0,3,5-7.", required=True)
_OUT = flags.DEFINE_string("out_dir", None, "Where to write the keys.",
                           required=True)


def parse_ids(text):
  """``"0,3,5-7"`` -> ``[0, 3, 5, 6, 7]``; ValueError on anything else."""
  ids = []
  for part in text.split(","):
    part = part.strip()
    lo, sep, hi = part.partition("-")
    if not lo.isdigit() or (sep and not hi.isdigit()):
      raise ValueError(f"--client_ids: {part!r} is neither an id nor a range a-b")
    ids.extend(range(int(lo), int(hi) + 1) if sep else [int(lo)])
  if len(set(ids)) != len(ids):
    raise ValueError(f"--client_ids lists an id twice: {text!r}")
  return ids


def main(argv):
  del argv
  try:
    ids = parse_ids(_IDS.value)
  except ValueError as e:
    raise app.UsageError(str(e))
  for k, (priv, pub) in signing.generate_keys(_OUT.value, ids).items():
    print(f"client {k}: {priv} {pub}")


if __name__ == "__main__":
  app.run(main)
