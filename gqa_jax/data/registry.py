"""Registering our seqio tasks and mixtures: re-registering a name replaces it, so
a module reload or a second call with another vocabulary never trips seqio's
duplicate check."""

import seqio


def add_task(name: str, **kwargs) -> seqio.Task:
  seqio.TaskRegistry.remove(name)
  return seqio.TaskRegistry.add(name, **kwargs)


def add_mixture(name: str, tasks, **kwargs) -> seqio.Mixture:
  seqio.MixtureRegistry.remove(name)
  return seqio.MixtureRegistry.add(name, tasks, **kwargs)
