"""The ``:arg`` of a config file: ``--config=path.py:a,b`` names options.

big_vision-style: a config file's ``get_config(arg)`` receives the text after
the colon; this module turns it into the set of names it holds.
"""


def parse_arg(arg, allowed, what="config argument options"):
  """Splits ``"a,b"`` into a set of names, each one of ``allowed``.

  Raises:
    ValueError: naming the unknown names and the allowed ones.
  """
  chosen = {o.strip() for o in (arg or "").split(",") if o.strip()}
  unknown = sorted(chosen - set(allowed))
  if unknown:
    raise ValueError(f"{what} {unknown} are unknown; allowed: "
                     f"{list(allowed)}")
  return chosen
