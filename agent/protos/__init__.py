"""Istio's small protos, built at run time (`runtime.build`): the CA service's messages (`istio_ca`)."""
