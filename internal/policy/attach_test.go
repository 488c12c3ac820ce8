package policy

import (
	"slices"
	"testing"
	"time"

	"k8s.io/apimachinery/pkg/labels"
)

var t0 = time.Unix(1e9, 0)

func TestResolve(t *testing.T) {
	web := Service{Name: "web", Labels: labels.Set{"tier": "front"}, Ports: []string{"http", "https"}}
	db := Service{Name: "db", Labels: labels.Set{"tier": "back"}, Ports: []string{"sql"}}
	tier := func(v string) labels.Selector { return labels.SelectorFromSet(labels.Set{"tier": v}) }
	for _, tc := range []struct {
		name       string
		policies   []Policy
		perPort    bool
		attached   map[string][]string
		overridden map[string][]string
		missing    map[string][]string
	}{
		{
			name:     "one policy, by name and by selector",
			policies: []Policy{{Name: "a", Created: t0, Targets: []Target{{Service: "web"}}, Selector: tier("back")}},
			attached: map[string][]string{"a": {"db", "web"}},
		},
		{
			name: "older wins",
			policies: []Policy{
				{Name: "new", Created: t0.Add(time.Hour), Targets: []Target{{Service: "web"}}},
				{Name: "old", Created: t0, Targets: []Target{{Service: "web"}}},
			},
			attached:   map[string][]string{"old": {"web"}},
			overridden: map[string][]string{"new": {"web (by old, which is older)"}},
		},
		{
			name: "name beats selector even when younger",
			policies: []Policy{
				{Name: "young", Created: t0.Add(time.Hour), Targets: []Target{{Service: "web"}}},
				{Name: "elder", Created: t0, Selector: tier("front")},
			},
			attached:   map[string][]string{"young": {"web"}},
			overridden: map[string][]string{"elder": {"web (by young, which names it in targetRefs)"}},
		},
		{
			name: "same age: name sorts",
			policies: []Policy{
				{Name: "b", Created: t0, Targets: []Target{{Service: "db"}}},
				{Name: "a", Created: t0, Targets: []Target{{Service: "db"}}},
			},
			attached:   map[string][]string{"a": {"db"}},
			overridden: map[string][]string{"b": {"db (by a, whose name sorts first)"}},
		},
		{
			name:     "missing targets",
			policies: []Policy{{Name: "a", Created: t0, Targets: []Target{{Service: "nope"}, {Service: "web", Port: "grpc"}}}},
			perPort:  true,
			missing:  map[string][]string{"a": {"Service nope", "port grpc of Service web"}},
		},
		{
			name: "per port: a port-level policy and a service-level one split the ports",
			policies: []Policy{
				{Name: "all", Created: t0.Add(time.Hour), Targets: []Target{{Service: "web"}}},
				{Name: "https", Created: t0, Targets: []Target{{Service: "web", Port: "https"}}},
			},
			perPort:    true,
			attached:   map[string][]string{"all": {"web/http"}, "https": {"web/https"}},
			overridden: map[string][]string{"all": {"web/https (by https, which is older)"}},
		},
	} {
		t.Run(tc.name, func(t *testing.T) {
			got := Resolve(tc.policies, []Service{web, db}, tc.perPort)
			for _, p := range tc.policies {
				r := got[p.Name]
				if !slices.Equal(r.Attached, tc.attached[p.Name]) || !slices.Equal(r.Overridden, tc.overridden[p.Name]) || !slices.Equal(r.Missing, tc.missing[p.Name]) {
					t.Errorf("%s: attached %v overridden %v missing %v; want %v %v %v", p.Name, r.Attached, r.Overridden, r.Missing,
						tc.attached[p.Name], tc.overridden[p.Name], tc.missing[p.Name])
				}
			}
		})
	}
}
