# egressd fleet on AWS: an egress VPC holding an Auto Scaling group of egressd appliances behind an
# internal Network Load Balancer (proxy TCP 3128, DNS TCP+UDP 53, source-IP stickiness), NAT
# gateways with Elastic IPs for the way out, and the peering, routes and DHCP options that make a
# browser VPC use it. See deploy/README.md for the walk-through and every number to choose.
terraform {
  required_version = ">= 1.5.0"

  required_providers {
    aws = {
      source  = "hashicorp/aws"
      version = ">= 5.70.0, < 6.0.0"
    }
  }
}
