"""The mesh side of the product: Istio manifest validation and the EnvoyFilter generated for the chart."""
