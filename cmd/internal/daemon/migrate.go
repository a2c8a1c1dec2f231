package daemon

import (
	"context"

	"github.com/baton-gw/baton/proxy"
	"github.com/baton-gw/baton/supervisor"
)

// Migrate implements admin.Steerer: batonctl migrate.
func (d *daemon) Migrate(ctx context.Context, slots []int) (supervisor.MigrateResult, error) {
	return d.sup.Migrate(ctx, slots)
}

// Migration implements metrics.Source.
func (d *daemon) Migration() proxy.MigrationStats { return d.gw.MigrationStats() }
