// Command coredns is a cluster-DNS-only CoreDNS for the fedkube test environment,
// built by tools/k8s-testenv/build-node.sh.
//
// It carries only the plugins that cluster DNS needs and none that send a query
// off the machine: forward and loop are left out on purpose, so a name outside
// the cluster domain gets SERVFAIL/NXDOMAIN instead of leaving the host. To add a
// plugin, blank-import it below and put its name in directives, at its place in
// CoreDNS's own order (core/dnsserver/zdirectives.go of the pinned version).
package main

import (
	"fmt"
	"os"

	"github.com/coredns/coredns/core/dnsserver"
	"github.com/coredns/coredns/coremain"

	_ "github.com/coredns/coredns/plugin/bind"
	_ "github.com/coredns/coredns/plugin/cache"
	_ "github.com/coredns/coredns/plugin/errors"
	_ "github.com/coredns/coredns/plugin/health"
	_ "github.com/coredns/coredns/plugin/kubernetes"
	_ "github.com/coredns/coredns/plugin/log"
	_ "github.com/coredns/coredns/plugin/ready"
)

// directives lists the plugins a Corefile may use, in execution order (a
// subsequence of CoreDNS's generated order), not in Corefile order. A plugin that
// is linked but not listed here is rejected in a Corefile.
var directives = []string{
	"bind",
	"ready",
	"health",
	"prometheus", // linked in anyway (kubernetes and cache import plugin/metrics)
	"errors",
	"log",
	"cache",
	"kubernetes",
}

func main() {
	if err := dnsserver.SetDirectives(directives); err != nil {
		fmt.Fprintln(os.Stderr, "coredns:", err)
		os.Exit(1)
	}
	coremain.Run()
}
