"""White-box benchmarks of the gateway (``moat bench``): they time its internals (the protection
pipeline, detectors, stores, the embedded backend) as well as whole processes, so this package may
import ``gateway`` internals and ``evaluation`` (data, endpoints). It sits above both; nothing of
moat imports it, and the proxy image does not ship it.
"""
