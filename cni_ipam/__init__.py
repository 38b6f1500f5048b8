"""cni-ipam: a CNI IPAM plugin with node-affine blocks in etcd."""
__version__ = "0.2.0"
