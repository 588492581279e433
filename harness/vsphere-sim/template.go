package main

// -template NAME: a template made at start-up, the way an operator makes one: a
// powered-off full clone of the first VM, with a snapshot (so linked clones can be
// made from it), marked as a template. Done through the simulator's own SOAP API
// with govmomi's client, before the start-up lines are printed.

import (
	"context"
	"fmt"
	"net/url"
	"sort"

	"github.com/vmware/govmomi"
	"github.com/vmware/govmomi/find"
	"github.com/vmware/govmomi/object"
	"github.com/vmware/govmomi/vim25/types"
)

func makeTemplate(u *url.URL, name string) error {
	ctx := context.Background()
	c, err := govmomi.NewClient(ctx, u, true)
	if err != nil {
		return fmt.Errorf("login: %v", err)
	}
	defer func() { _ = c.Logout(ctx) }()
	finder := find.NewFinder(c.Client, false)
	dcs, err := finder.DatacenterList(ctx, "*")
	if err != nil || len(dcs) == 0 {
		return fmt.Errorf("no datacenter: %v", err)
	}
	sort.Slice(dcs, func(i, j int) bool { return dcs[i].InventoryPath < dcs[j].InventoryPath })
	finder.SetDatacenter(dcs[0])
	vms, err := finder.VirtualMachineList(ctx, "*")
	if err != nil || len(vms) == 0 {
		return fmt.Errorf("no VM to copy: %v", err)
	}
	sort.Slice(vms, func(i, j int) bool { return vms[i].InventoryPath < vms[j].InventoryPath })
	src := vms[0]
	folders, err := dcs[0].Folders(ctx)
	if err != nil {
		return err
	}
	var pool types.ManagedObjectReference
	if p, err := src.ResourcePool(ctx); err == nil {
		pool = p.Reference()
	} else {
		return fmt.Errorf("resource pool of %s: %v", src.InventoryPath, err)
	}
	spec := types.VirtualMachineCloneSpec{Location: types.VirtualMachineRelocateSpec{Pool: &pool}}
	task, err := src.Clone(ctx, folders.VmFolder, name, spec)
	if err != nil {
		return err
	}
	info, err := task.WaitForResult(ctx, nil)
	if err != nil {
		return fmt.Errorf("clone: %v", err)
	}
	vm := object.NewVirtualMachine(c.Client, info.Result.(types.ManagedObjectReference))
	if state, err := vm.PowerState(ctx); err == nil && state == types.VirtualMachinePowerStatePoweredOn {
		t, err := vm.PowerOff(ctx)
		if err == nil {
			err = t.Wait(ctx)
		}
		if err != nil {
			return fmt.Errorf("power off: %v", err)
		}
	}
	t, err := vm.CreateSnapshot(ctx, "gve-base", "linked clones share this", false, false)
	if err == nil {
		err = t.Wait(ctx)
	}
	if err != nil {
		return fmt.Errorf("snapshot: %v", err)
	}
	return vm.MarkAsTemplate(ctx)
}
