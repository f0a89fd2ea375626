"""The vocabulary the algorithms share with the gateway and the lab: the component registry
(:mod:`contracts.registry`), parameter checking (:mod:`contracts.params`), the query batch and
verdict types (:mod:`contracts.batch`) and the state-store protocol (:mod:`contracts.state`).

It imports nothing else of moat's, so ``detectors/`` and ``defenses/`` depend on it alone and a
researcher can use them offline, without the gateway.
"""
