// The e2e cluster's image registry: distribution's registry with only what the e2e uses, the
// filesystem storage driver and htpasswd authentication (its upstream command links every cloud
// storage driver too, which this registry never needs).
package main

import (
	"os"

	"github.com/distribution/distribution/v3/registry"
	_ "github.com/distribution/distribution/v3/registry/auth/htpasswd"
	_ "github.com/distribution/distribution/v3/registry/storage/driver/filesystem"
)

func main() {
	if err := registry.RootCmd.Execute(); err != nil {
		os.Exit(1)
	}
}
