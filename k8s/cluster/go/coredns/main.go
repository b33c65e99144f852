// The cluster's DNS: CoreDNS with only the plugins a cluster-local resolver needs (kubernetes,
// cache, errors, health, ready), in the order of CoreDNS's own plugin.cfg, which is the order a
// query passes through them. Knative's components find each other and the revisions they probe by
// their cluster-local names.
package main

import (
	"github.com/coredns/coredns/core/dnsserver"
	"github.com/coredns/coredns/coremain"
	_ "github.com/coredns/coredns/plugin/cache"
	_ "github.com/coredns/coredns/plugin/errors"
	_ "github.com/coredns/coredns/plugin/health"
	_ "github.com/coredns/coredns/plugin/kubernetes"
	_ "github.com/coredns/coredns/plugin/ready"
)

func init() {
	dnsserver.Directives = []string{"ready", "health", "errors", "cache", "kubernetes"}
}

func main() {
	coremain.Run()
}
