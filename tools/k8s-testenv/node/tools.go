//go:build tools

// Package node pins the Kubernetes node components (kubelet, kube-proxy) that
// tools/k8s-testenv/build-node.sh builds for the test environment.
package node

import (
	_ "k8s.io/kubernetes/cmd/kube-proxy"
	_ "k8s.io/kubernetes/cmd/kubelet"
)
