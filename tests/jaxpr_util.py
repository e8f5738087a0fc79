"""Reading jaxprs in tests: the equations of one primitive, nested jaxprs included."""

from jax.extend.core import ClosedJaxpr, Jaxpr


def equations(jaxpr, primitive: str | None):
    """Every ``primitive`` equation (every equation for None) in ``jaxpr`` (a Jaxpr or ClosedJaxpr) and in the
    jaxprs nested in its equations' parameters (scan and while bodies, pjit, custom_vjp and custom_jvp calls,
    ...)."""
    jaxpr = jaxpr.jaxpr if isinstance(jaxpr, ClosedJaxpr) else jaxpr
    for e in jaxpr.eqns:
        if primitive is None or e.primitive.name == primitive:
            yield e
        for p in e.params.values():
            for sub in p if isinstance(p, (list, tuple)) else [p]:
                if isinstance(sub, (ClosedJaxpr, Jaxpr)):
                    yield from equations(sub, primitive)
