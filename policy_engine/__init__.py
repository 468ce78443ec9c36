"""policy-engine: policy decisions for LLM traffic in an Istio/Envoy mesh."""

__version__ = "0.1.0"
