"""Names for the arguments that accept several kinds of object, for signatures.

Each is ``Any`` to the type checker (the functions check what comes, with the house
messages); the API reference writes the name and links it to its entry in
docs/conventions.md ("Types in signatures"), which says what is accepted.
"""

from typing import Any

#: One linearization, or an iterable of them (a list, or a generator streamed once).
Source = Any

#: One loss function, or an iterable of them (a list, or a generator streamed once).
LossSource = Any

#: ``None``, an int seed, a ``numpy.random.Generator`` or a JAX PRNG key.
RngLike = Any

#: ``None``, a ``torch.distributed`` process group, or a JAX mapped axis name.
ProcessGroup = Any
