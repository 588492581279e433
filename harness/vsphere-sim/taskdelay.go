package main

// -task-delay: tasks that go on on the server after their method answered, as a real
// vCenter's clone or relocation does while it copies disks. govmomi 0.24.2 runs every
// task to its end before the method answers (-method-delay holds the request itself).

import (
	"bytes"
	"context"
	"fmt"
	"io"
	"net/http"
	"net/http/httptest"
	"regexp"
	"strings"
	"time"

	"github.com/vmware/govmomi/simulator"
	"github.com/vmware/govmomi/vim25/types"
)

var (
	// taskDelays: how long each named ..._Task method's task runs, in ms.
	taskDelays map[string]int
	methodRe   = regexp.MustCompile(`<(?:[\w-]+:)?(\w+_Task)[\s>]`)
	thisRe     = regexp.MustCompile(`<(?:[\w-]+:)?_this[^>]*\btype="(\w+)"[^>]*>([^<]+)<`)
	returnRe   = regexp.MustCompile(`<returnval[^>]*>([^<]+)</returnval>`)
	faultRe    = regexp.MustCompile(`<faultstring>([^<]*)</faultstring>`)
)

// serveDelayedTasks routes SOAP requests to the simulator, except the methods of
// taskDelays: those answer at once with a task of their own that stays running for
// the delay, then runs the real method and ends as it did.
func serveDelayedTasks(service *simulator.Service) http.HandlerFunc {
	return func(w http.ResponseWriter, r *http.Request) {
		body, err := io.ReadAll(r.Body)
		if err != nil {
			http.Error(w, err.Error(), http.StatusBadRequest)
			return
		}
		r.Body = io.NopCloser(bytes.NewReader(body))
		m, this := methodRe.FindSubmatch(body), thisRe.FindSubmatch(body)
		if m == nil || this == nil {
			service.ServeSDK(w, r)
			return
		}
		method := string(m[1])
		ms, ok := taskDelays[method]
		if !ok {
			service.ServeSDK(w, r)
			return
		}
		ref := types.ManagedObjectReference{Type: string(this[1]), Value: string(this[2])}
		task := simulator.CreateTask(ref, strings.TrimSuffix(method, "_Task")+"Task", nil)
		simulator.Map.WithLock(task, func() {
			simulator.Map.Update(task, []types.PropertyChange{
				{Name: "info.startTime", Val: time.Now()},
				{Name: "info.state", Val: types.TaskInfoStateRunning},
			})
		})
		later := r.Clone(context.Background())
		later.Body = io.NopCloser(bytes.NewReader(body))
		go finishLater(service, later, task, time.Duration(ms)*time.Millisecond)
		w.Header().Set("Content-Type", "text/xml; charset=utf-8")
		fmt.Fprintf(w, `<?xml version="1.0" encoding="UTF-8"?>
<soapenv:Envelope xmlns:soapenv="http://schemas.xmlsoap.org/soap/envelope/" xmlns:xsd="http://www.w3.org/2001/XMLSchema" xmlns:xsi="http://www.w3.org/2001/XMLSchema-instance"><soapenv:Body><%sResponse xmlns="urn:vim25"><returnval type="Task">%s</returnval></%sResponse></soapenv:Body></soapenv:Envelope>`,
			method, task.Self.Value, method)
	}
}

// finishLater runs the held request after d and ends task as the real one ended.
func finishLater(service *simulator.Service, r *http.Request, task *simulator.Task, d time.Duration) {
	time.Sleep(d)
	rec := httptest.NewRecorder()
	service.ServeSDK(rec, r)
	out := rec.Body.Bytes()
	changes := []types.PropertyChange{{Name: "info.completeTime", Val: time.Now()}}
	if got := returnRe.FindSubmatch(out); got != nil {
		real, _ := simulator.Map.Get(types.ManagedObjectReference{Type: "Task", Value: string(got[1])}).(*simulator.Task)
		if real == nil {
			changes = append(changes, failed("the delayed task's real task "+string(got[1])+" is gone")...)
		} else {
			var fault interface{}
			if real.Info.Error != nil {
				fault = *real.Info.Error
			}
			changes = append(changes,
				types.PropertyChange{Name: "info.state", Val: real.Info.State},
				types.PropertyChange{Name: "info.result", Val: real.Info.Result},
				types.PropertyChange{Name: "info.error", Val: fault})
		}
	} else {
		reason := "the delayed method failed"
		if f := faultRe.FindSubmatch(out); f != nil {
			reason = string(f[1])
		}
		changes = append(changes, failed(reason)...)
	}
	simulator.Map.WithLock(task, func() { simulator.Map.Update(task, changes) })
}

// failed is a task's end with a SystemError saying reason.
func failed(reason string) []types.PropertyChange {
	return []types.PropertyChange{
		{Name: "info.state", Val: types.TaskInfoStateError},
		{Name: "info.error", Val: types.LocalizedMethodFault{
			Fault: &types.SystemError{Reason: reason}, LocalizedMessage: reason}},
	}
}
