"""`cni-ipam controller`: automatic leak GC, dead-node cleanup, Prometheus metrics, one leader via etcd."""
