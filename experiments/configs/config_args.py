"""The ``:arg`` of a config file: ``--config=path.py:arg``.

big_vision-style: a config file's ``get_config(arg)`` receives the text after
the colon. Every config file reads it through this module: ``parse_arg`` for
a comma-separated set of options (``ids_5g.py:drop_gtp,as_image``),
``one_of`` for a single choice (``reference_table.py:ipc``).
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


def one_of(arg, allowed, what="config argument"):
  """``arg`` (stripped) if it is one of ``allowed``.

  Raises:
    ValueError: naming ``arg`` and the allowed values.
  """
  value = (arg or "").strip()
  if value not in allowed:
    raise ValueError(f"{what} must be one of {list(allowed)}, got {value!r}")
  return value
